/*
 * stk_main: leaks fds through libstk's exported stk_open_leak, from a known
 * function (leak_through_lib), for the native stack tests
 * (tests/tests/native_stacks.rs).
 *
 * Usage: stk_main PATH N
 *
 * Opens PATH N times through leak_through_lib -> stk_open_leak (libstk) ->
 * stk_hidden_open (static in libstk) -> open (libc), and keeps every fd.
 * Prints `ready <pid>` once done, then stays until orphaned (the test or
 * fdtrace that started it is gone) or 60 s passed, so that its stacks can be
 * symbolized while it lives.
 *
 * Build: cc -O0 -g -fno-omit-frame-pointer -o stk_main stk_main.c -L. -lstk
 *        -Wl,-rpath,DIR
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int stk_open_leak(const char *path);

static int __attribute__((noinline)) leak_through_lib(const char *path)
{
	int fd = stk_open_leak(path);

	if (fd < 0) {
		perror(path);
		exit(1);
	}
	return fd;
}

int main(int argc, char **argv)
{
	pid_t parent = getppid();

	if (argc != 3) {
		fprintf(stderr, "usage: stk_main PATH N\n");
		return 2;
	}
	for (int i = atoi(argv[2]); i > 0; i--)
		leak_through_lib(argv[1]);
	printf("ready %d\n", getpid());
	fflush(stdout);
	for (int i = 0; i < 600 && getppid() == parent; i++)
		usleep(100000);
	return 0;
}

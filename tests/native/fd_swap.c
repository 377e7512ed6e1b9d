/*
 * fd_swap: takes one fd number in turns for two files from two call sites,
 * for the native stack tests (tests/tests/native_stacks.rs).
 *
 * Usage: fd_swap A B SECONDS WRAPPER
 *
 * open_a opens A, holds it 50-350 us and closes it; then open_b does the
 * same with B; again and again for SECONDS. open_a calls libc's open; open_b
 * calls openat when WRAPPER is "openat", open when it is "open". libc's open
 * keeps the path in RBP, so the kernel's frame-pointer walk from it reads
 * the path's bytes 8 to 15 as a return address: from two paths alike there,
 * both callers get one kernel stack.
 *
 * Both fds get the same number, so a report that read the kernel's table
 * while A was open and its link in /proc after B took the number would show
 * B under open_a's call site.
 *
 * Build: cc -O0 -g -fno-omit-frame-pointer -o fd_swap fd_swap.c
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int __attribute__((noinline)) open_a(const char *path)
{
	return open(path, O_RDONLY);
}

static int use_openat;

static int __attribute__((noinline)) open_b(const char *path)
{
	if (use_openat)
		return openat(AT_FDCWD, path, O_RDONLY);
	return open(path, O_RDONLY);
}

static void hold(int fd, const char *path)
{
	if (fd < 0) {
		perror(path);
		exit(1);
	}
	usleep(50 + rand() % 300);
	close(fd);
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: fd_swap A B SECONDS open|openat\n");
		return 2;
	}
	use_openat = strcmp(argv[4], "openat") == 0;
	time_t end = time(NULL) + atoi(argv[3]);

	while (time(NULL) < end) {
		hold(open_a(argv[1]), argv[1]);
		hold(open_b(argv[2]), argv[2]);
	}
	return 0;
}

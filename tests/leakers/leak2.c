/*
 * leak2: leaks fds from two distinct functions at two known rates, for the
 * fdtrace leak tests (tests/tests/leaks.rs).
 *
 * Usage: leak2 RATE_A RATE_B
 *
 * leak_sockets() leaks one socket(AF_INET, SOCK_DGRAM) per call, RATE_A calls
 * per second; leak_files() leaks one open("/dev/null") per call, RATE_B calls
 * per second. Both are noinline so each has its own frame in the stack of the
 * fds it creates. The calls are paced on CLOCK_MONOTONIC: the k-th call of a
 * function is due at t0 + k/rate (no sleep drift). Sets its RLIMIT_NOFILE soft
 * limit to 1024, prints `ready <pid>` once started, runs until killed or
 * orphaned (it exits when its parent is gone: a test that died leaves no
 * leaker behind; not PR_SET_PDEATHSIG, which fires when the parent *thread*
 * ends). Calls that fail (EMFILE once the limit is reached) are reported once
 * on stderr; the pace goes on.
 *
 * Build: gcc -O0 -g -fno-omit-frame-pointer -o leak2 leak2.c
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int failed;

static void report_failure(const char *what)
{
	if (!failed) {
		failed = 1;
		fprintf(stderr, "leak2: %s: %s\n", what, strerror(errno));
	}
}

__attribute__((noinline)) int leak_sockets(void)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0)
		report_failure("socket");
	return fd;
}

__attribute__((noinline)) int leak_files(void)
{
	int fd = open("/dev/null", O_RDONLY);
	if (fd < 0)
		report_failure("open /dev/null");
	return fd;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_until(double t)
{
	double d = t - now();
	if (d <= 0)
		return;
	struct timespec ts = {(time_t)d, (long)((d - (time_t)d) * 1e9)};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s RATE_A RATE_B\n", argv[0]);
		return 2;
	}
	double rate_a = atof(argv[1]), rate_b = atof(argv[2]);
	if (!(rate_a > 0) || !(rate_b > 0)) {
		fprintf(stderr, "leak2: rates must be > 0\n");
		return 2;
	}
	pid_t parent = getppid();
	if (parent == 1)
		return 0;
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
		rl.rlim_cur = 1024;
		if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < rl.rlim_cur)
			rl.rlim_cur = rl.rlim_max;
		if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
			perror("setrlimit");
			return 1;
		}
	}
	char line[64];
	int n = snprintf(line, sizeof line, "ready %d\n", (int)getpid());
	if (write(1, line, n) != n)
		return 1;

	double t0 = now();
	unsigned long ka = 0, kb = 0;
	for (;;) {
		if (getppid() != parent)
			return 0;
		double due_a = t0 + ka / rate_a, due_b = t0 + kb / rate_b;
		if (due_a <= due_b) {
			sleep_until(due_a);
			ka++;
			leak_sockets();
		} else {
			sleep_until(due_b);
			kb++;
			leak_files();
		}
	}
}

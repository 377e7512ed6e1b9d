/*
 * libstk: a shared library whose exported entry opens files through a static
 * function, for the native stack tests (tests/tests/native_stacks.rs).
 *
 * The test builds it without frame pointers and strips it: the static
 * function then has no symbol at all, and its frame must show as
 * libstk.so+0xOFFSET, never as the exported function laid out before it
 * (stk_neighbour). No frame pointers also means the kernel's frame-pointer
 * walk cannot get through it: the frames above libc's open come from the
 * unwinding of the saved stack window.
 *
 * Build: cc -O1 -fPIC -shared -fomit-frame-pointer -fno-optimize-sibling-calls
 *        -fno-inline -fno-toplevel-reorder -fno-reorder-functions
 *        -o libstk.so stk_lib.c && strip libstk.so
 */
#include <fcntl.h>

/* Exported, right before the static function in the text. */
int stk_neighbour(int x)
{
	return x * 3 + 1;
}

/* The call to open is no tail call (its result is checked), so this frame is
 * on the stack when the syscall runs. */
static int __attribute__((noinline)) stk_hidden_open(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return -1;
	return fd;
}

/* Opens `path` and leaks the fd (returns it, the caller never closes it). */
int stk_open_leak(const char *path)
{
	int fd = stk_hidden_open(path);

	return fd < 0 ? -1 : fd + stk_neighbour(0) - 1;
}

/* vmrt-enosys NR...: which of the syscall numbers given the kernel in front of
 * this process (and its seccomp filter) answers with ENOSYS.
 *
 * Prints one line per number, "NR ENOSYS" or "NR ok". Each syscall is made
 * with all-zero arguments in a forked child of its own under a 300 ms timer,
 * so a call that blocks (pause, select), changes the caller (seccomp strict
 * mode, ptrace(TRACEME), personality) or ends it (exit) harms only that child;
 * a child that ends or is killed before it answers counts as "ok": the kernel
 * had the call. Zero arguments make no multiplexing call (futex, ...) pick an
 * unknown operation, which some answer with ENOSYS. A benign probe: it asks
 * the kernel what it has, nothing more. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

static char answer(long nr)
{
	int p[2];
	char c = 'y';
	pid_t pid;

	if (pipe(p) < 0)
		return '?';
	pid = fork();
	if (pid < 0) {
		close(p[0]);
		close(p[1]);
		return '?';
	}
	if (pid == 0) {
		struct itimerval t = { .it_value = { .tv_sec = 0, .tv_usec = 300000 } };

		close(p[0]);
		signal(SIGALRM, SIG_DFL);
		setitimer(ITIMER_REAL, &t, NULL);
		long r = syscall(nr, 0L, 0L, 0L, 0L, 0L, 0L);
		char a = (r == -1 && errno == ENOSYS) ? 'n' : 'y';
		(void)!write(p[1], &a, 1);
		_exit(0);
	}
	close(p[1]);
	if (read(p[0], &c, 1) != 1)
		c = 'y';
	close(p[0]);
	for (;;) {
		int st;
		pid_t w = waitpid(pid, &st, __WALL);

		if (w < 0 && errno == EINTR)
			continue;
		if (w == pid && WIFSTOPPED(st)) { /* it asked to be traced */
			kill(pid, SIGKILL);
			continue;
		}
		break;
	}
	/* reap whatever the call itself forked (fork, vfork, clone) */
	while (waitpid(-1, NULL, WNOHANG | __WALL) > 0)
		;
	return c;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (int i = 1; i < argc; i++) {
		char *end;
		long nr = strtol(argv[i], &end, 10);

		if (*argv[i] == '\0' || *end != '\0' || nr < 0 || nr > 4095) {
			fprintf(stderr, "vmrt-enosys: not a syscall number: %s\n", argv[i]);
			return 2;
		}
		char c = answer(nr);
		printf("%ld %s\n", nr, c == 'n' ? "ENOSYS" : c == 'y' ? "ok" : "unknown");
	}
	return 0;
}

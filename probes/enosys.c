/* vmrt-enosys NR...: which of the syscall numbers given the kernel in front of
 * this process (and its seccomp filter) answers with ENOSYS.
 *
 * Prints one line per number, "NR ENOSYS" or "NR ok". Each syscall is made
 * with all-zero arguments in a forked child of its own under a 300 ms timer,
 * so a call that blocks (pause, select), changes the caller (seccomp strict
 * mode, ptrace(TRACEME), personality) or ends it (exit) harms only that child;
 * a child that ends or is killed before it answers counts as "ok": the kernel
 * had the call. Zero arguments make no multiplexing call (futex, ...) pick an
 * unknown operation, which some answer with ENOSYS.
 *
 * What a zero-argument call can touch is the child's own: its descriptors 0-2
 * are fresh pipes and nothing else is open but its answer pipe (moved high),
 * so fchmod(0), ftruncate(0) and the like act on a pipe, never on the file the
 * probe's stdin came from (in process mode that can be the host's /dev/null);
 * pointers are NULL (EFAULT). What remains is the container's own state in its
 * own namespaces (IPC_RMID of IPC id 0, an empty hostname): the probe runs in a
 * throwaway container. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#define ANSWER_FD 64 /* where a child keeps its answer pipe: above 0-2 and the fds it closes */

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
		int out = fcntl(p[1], F_DUPFD, ANSWER_FD), z[2];

		if (out != ANSWER_FD || pipe(z) < 0 || dup2(z[0], 0) < 0 || dup2(z[1], 1) < 0 ||
		    dup2(z[1], 2) < 0)
			_exit(1); /* no answer: "ok", never a call made with the caller's fds */
		for (int fd = 3; fd < ANSWER_FD; fd++)
			close(fd);
		if (syscall(SYS_close_range, ANSWER_FD + 1, ~0U, 0) < 0)
			for (int fd = ANSWER_FD + 1; fd < 1024; fd++)
				close(fd);
		signal(SIGALRM, SIG_DFL);
		setitimer(ITIMER_REAL, &t, NULL);
		long r = syscall(nr, 0L, 0L, 0L, 0L, 0L, 0L);
		char a = (r == -1 && errno == ENOSYS) ? 'n' : 'y';
		(void)!write(out, &a, 1);
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

/* A container process (agent.h): its stdio (pipes or a terminal), the
 * container's cgroup and OOM count, and what its forked child does up to
 * exec: the main process enters the container root, an exec process the
 * container's mounts; both take the RUN's identity and search PATH (or,
 * with WALK_UPPER, walk the writable layer instead: walk.c). */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/openat2.h>
#include <linux/seccomp.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>

#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/* ---------------------------------------------------------------- stdio */

static void set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	if (fl >= 0)
		fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

/* Close the child's ends (once it has them). */
void stdio_close_child(struct stdio *s)
{
	if (s->child_in != s->child_out && s->child_in != s->child_err)
		close_fd(&s->child_in);
	if (s->child_err != s->child_out)
		close_fd(&s->child_err);
	close_fd(&s->child_out);
	s->child_in = s->child_err = -1;
}

/* Close our ends. */
void stdio_close(struct stdio *s)
{
	if (s->in >= 0 && s->in != s->master)
		close_fd(&s->in);
	if (s->out >= 0 && s->out != s->master)
		close_fd(&s->out);
	close_fd(&s->err);
	close_fd(&s->master);
	s->in = s->out = -1;
}

/* The process's stdio: pipes, or a terminal of the container's devpts
 * instance (so that ttyname() works inside; its path goes to pts), or
 * /dev/null for all three (devnull).  Returns -1 with a message in err. */
int stdio_open(struct stdio *s, const struct vmrt_run *r, int devnull, char *pts,
		      size_t ptslen, char *err, size_t errlen)
{
	int p[2];

	s->master = s->in = s->out = s->err = -1;
	s->child_in = s->child_out = s->child_err = -1;
	if (devnull) {
		s->child_out = open("/dev/null", O_RDWR | O_CLOEXEC);
		if (s->child_out < 0)
			goto fail;
		s->child_in = s->child_err = s->child_out;
		return 0;
	}
	if (r->tty) {
		struct winsize ws = { .ws_row = r->rows, .ws_col = r->cols };
		unsigned ptn;
		int unlock = 0;

		s->master = open(ROOT "/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (s->master < 0) {
			snprintf(err, errlen, "cannot open a terminal: %s", strerror(errno));
			return -1;
		}
		if (ioctl(s->master, TIOCSPTLCK, &unlock) < 0 || ioctl(s->master, TIOCGPTN, &ptn) < 0) {
			snprintf(err, errlen, "cannot unlock the terminal: %s", strerror(errno));
			close_fd(&s->master);
			return -1;
		}
		snprintf(pts, ptslen, ROOT "/dev/pts/%u", ptn);
		s->child_out = open(pts, O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (s->child_out < 0) {
			snprintf(err, errlen, "cannot open %s: %s", pts, strerror(errno));
			close_fd(&s->master);
			return -1;
		}
		ioctl(s->master, TIOCSWINSZ, &ws);
		s->child_in = s->child_err = s->child_out;
		s->out = s->master;
		if (r->open_stdin)
			s->in = s->master;
		set_nonblock(s->master);
		return 0;
	}
	if (pipe2(p, O_CLOEXEC) < 0)
		goto fail;
	s->out = p[0];
	s->child_out = p[1];
	if (pipe2(p, O_CLOEXEC) < 0)
		goto fail;
	s->err = p[0];
	s->child_err = p[1];
	if (r->open_stdin) {
		if (pipe2(p, O_CLOEXEC) < 0)
			goto fail;
		s->child_in = p[0];
		s->in = p[1];
		set_nonblock(s->in);
	} else {
		s->child_in = open("/dev/null", O_RDONLY | O_CLOEXEC);
		if (s->child_in < 0)
			goto fail;
	}
	set_nonblock(s->out);
	set_nonblock(s->err);
	return 0;
fail:
	snprintf(err, errlen, "cannot set up stdio: %s", strerror(errno));
	stdio_close_child(s);
	stdio_close(s);
	return -1;
}

/* ---------------------------------------------------------------- child */

int errpipe_w = -1;

/* A cgroup v2 memory cgroup for the container, for the EXIT OOM flag. */
#define CGROUP "/sys/fs/cgroup/vmrt"
static int cgroup_ok;

int write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = write(fd, text, strlen(text));
	close(fd);
	return n == (ssize_t)strlen(text) ? 0 : -1;
}

void setup_cgroup(void)
{
	/* favordynmods: no RCU grace period in each task migration (the container's process and
	 * every exec join the cgroup: ~25 ms each under TCG); a kernel without it mounts plain */
	if ((mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NOEXEC | MS_NODEV, "favordynmods") < 0 &&
	     mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NOEXEC | MS_NODEV, NULL) < 0) ||
	    write_file("/sys/fs/cgroup/cgroup.subtree_control", "+memory +pids") < 0 ||
	    (mkdir(CGROUP, 0755) < 0 && errno != EEXIST)) {
		if (run.memory_max || run.pids_max)
			fatal(125, "cannot set up the container cgroup for its limits: %s", strerror(errno));
		con("memory cgroup unavailable (%s); OOM detection is guest-wide", strerror(errno));
		return;
	}
	cgroup_ok = 1;
	char v[32];
	if (run.memory_max) {
		snprintf(v, sizeof v, "%llu", (unsigned long long)run.memory_max);
		if (write_file(CGROUP "/memory.max", v) < 0)
			fatal(125, "cannot set the memory limit: %s", strerror(errno));
	}
	if (run.pids_max) {
		snprintf(v, sizeof v, "%llu", (unsigned long long)run.pids_max);
		if (write_file(CGROUP "/pids.max", v) < 0)
			fatal(125, "cannot set the pids limit: %s", strerror(errno));
	}
}

static void child_fail(int code, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
static void child_fail(int code, const char *fmt, ...)
{
	char buf[4 + 1024];
	uint32_t c = (uint32_t)code;
	va_list ap;
	int n;

	memcpy(buf, &c, 4);
	va_start(ap, fmt);
	n = vsnprintf(buf + 4, sizeof buf - 4, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n > sizeof buf - 5)
		n = (int)(sizeof buf - 5);
	(void)!write(errpipe_w, buf, 4 + (size_t)n);
	_exit(code);
}

/* strerror, lower-cased first letter as Docker prints it */
static const char *errstr(int e)
{
	static char buf[128];
	snprintf(buf, sizeof buf, "%s", strerror(e));
	if (buf[0] >= 'A' && buf[0] <= 'Z' && !(buf[1] >= 'A' && buf[1] <= 'Z'))
		buf[0] = (char)(buf[0] - 'A' + 'a');
	return buf;
}

static const char *env_get(char *const *envp, const char *key)
{
	size_t k = strlen(key);
	const char *v = NULL;

	for (; *envp; envp++)
		if (strncmp(*envp, key, k) == 0 && (*envp)[k] == '=')
			v = *envp + k + 1; /* last one wins, like a shell */
	return v;
}

static void write_etc(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
	if (fd < 0)
		return;
	(void)!write(fd, text, strlen(text));
	close(fd);
}

/* Some MOUNT record of the RUN has exactly this target (/etc/hostname,
 * /etc/hosts, /etc/resolv.conf: the host bind-mounts its managed copies). */
static int is_mount_target(const char *path)
{
	for (size_t k = 0; k < run.nmounts; k++)
		if (!strcmp(run.mounts[k].target, path))
			return 1;
	return 0;
}

static void exec_fail(const char *what, int e) __attribute__((noreturn));
static void exec_fail(const char *what, int e)
{
	if (e == ENOENT || e == ENOTDIR)
		child_fail(127, "exec: \"%s\": %s", what, errstr(e));
	if (e == EACCES || e == EISDIR || e == EPERM)
		child_fail(126, "exec: \"%s\": permission denied", what);
	child_fail(126, "exec: \"%s\": %s", what, errstr(e));
}

static void child_exec(const struct vmrt_run *r) __attribute__((noreturn));
static void child_exec(const struct vmrt_run *r)
{
	const char *name = r->argv[0];
	const char *path, *seg;
	char buf[PATH_MAX];
	int eacces = 0;

	if (strchr(name, '/')) {
		execve(name, r->argv, r->envp);
		exec_fail(name, errno);
	}
	path = env_get(r->envp, "PATH");
	if (!path)
		path = DEFAULT_PATH;
	if (name[0] != '\0') {
		for (seg = path;; seg++) {
			const char *end = strchrnul(seg, ':');
			size_t dl = (size_t)(end - seg);
			int n;

			if (dl == 0)
				n = snprintf(buf, sizeof buf, "%s", name);
			else
				n = snprintf(buf, sizeof buf, "%.*s/%s", (int)dl, seg, name);
			if (n > 0 && (size_t)n < sizeof buf) {
				execve(buf, r->argv, r->envp);
				switch (errno) {
				case EACCES:
					eacces = 1;
					break;
				case ENOENT: case ENOTDIR: case ESTALE: case ENAMETOOLONG:
				case ELOOP: case ENODEV: case ETIMEDOUT: case EISDIR:
					break;
				default:
					exec_fail(name, errno);
				}
			}
			if (*end == '\0')
				break;
			seg = end;
		}
	}
	if (eacces)
		child_fail(126, "exec: \"%s\": permission denied", name);
	child_fail(127, "exec: \"%s\": executable file not found in $PATH", name);
}

/* The container's capabilities and no_new_privs (from its RUN), then who's
 * groups, gid and uid. */
/* The RUN's seccomp filter (the process-mode profile, compiled by the host),
 * as runc installs it: what the container may call is the same in both
 * isolations. With no_new_privs (vmrt's own bundles always ask for it) it is
 * installed last before execve. Without (an OCI engine's bundle, as podman's
 * by default) installing one needs CAP_SYS_ADMIN, so, as runc, it goes in
 * before the capabilities are dropped (apply_identity), and the identity
 * calls after it are the profile's to allow. Once per process. */
static int seccomp_done;

static void apply_seccomp(void)
{
	struct sock_fprog prog = { .len = (unsigned short)(run.seccomp_len / 8),
				   .filter = (struct sock_filter *)(void *)run.seccomp };

	if (seccomp_done)
		return;
	seccomp_done = 1;
	if (run.seccomp_len && syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0)
		child_fail(125, "cannot install the seccomp filter: %s", strerror(errno));
}

/* An O_PATH fd of an absolute path in the container's root (the child's "/"),
 * following no symlink at all: the image cannot redirect a mask. */
static int open_nofollow(const char *path)
{
	struct open_how how = { .flags = O_PATH | O_CLOEXEC,
				.resolve = RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS };
	return (int)syscall(SYS_openat2, AT_FDCWD, path, &how, sizeof how);
}

/* OCI maskedPaths and readonlyPaths, as runc applies them in process mode: a
 * masked directory gets an empty read-only tmpfs, a masked file /dev/null
 * bound over it; a read-only path is bound onto itself and remounted
 * read-only, keeping its nosuid/nodev/noexec. Paths that do not exist are
 * skipped (as runc); any other failure stops the start. */
static void mask_paths(void)
{
	char fdpath[64];
	struct stat st;

	for (size_t k = 0; k < run.nmasked; k++) {
		int fd = open_nofollow(run.masked[k]);
		if (fd < 0 && errno == ENOENT)
			continue;
		if (fd < 0 || fstat(fd, &st) < 0)
			child_fail(125, "cannot mask %s: %s", run.masked[k], strerror(errno));
		snprintf(fdpath, sizeof fdpath, "/proc/self/fd/%d", fd);
		if (S_ISDIR(st.st_mode) ? mount("tmpfs", fdpath, "tmpfs", MS_RDONLY, "size=0") < 0
					: mount("/dev/null", fdpath, NULL, MS_BIND, NULL) < 0)
			child_fail(125, "cannot mask %s: %s", run.masked[k], strerror(errno));
		close(fd);
	}
	for (size_t k = 0; k < run.nro_paths; k++) {
		struct statvfs sv;
		unsigned long keep;
		int fd = open_nofollow(run.ro_paths[k]);

		if (fd < 0 && errno == ENOENT)
			continue;
		snprintf(fdpath, sizeof fdpath, "/proc/self/fd/%d", fd);
		if (fd < 0 || mount(fdpath, fdpath, NULL, MS_BIND | MS_REC, NULL) < 0)
			child_fail(125, "cannot make %s read-only: %s", run.ro_paths[k], strerror(errno));
		close(fd);
		/* the bind is on top now: open it again to remount that one */
		fd = open_nofollow(run.ro_paths[k]);
		if (fd < 0 || fstatvfs(fd, &sv) < 0)
			child_fail(125, "cannot make %s read-only: %s", run.ro_paths[k], strerror(errno));
		keep = (sv.f_flag & ST_NOSUID ? MS_NOSUID : 0) | (sv.f_flag & ST_NODEV ? MS_NODEV : 0) |
		       (sv.f_flag & ST_NOEXEC ? MS_NOEXEC : 0);
		snprintf(fdpath, sizeof fdpath, "/proc/self/fd/%d", fd);
		if (mount(NULL, fdpath, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, NULL) < 0)
			child_fail(125, "cannot make %s read-only: %s", run.ro_paths[k], strerror(errno));
		close(fd);
	}
}

/* The process's rlimits (OCI process.rlimits), as runc sets them: before the
 * identity changes, while raising a hard limit is still allowed. */
static void apply_rlimits(const struct vmrt_run *who)
{
	for (size_t k = 0; k < who->nrlimits; k++) {
		struct rlimit rl = { .rlim_cur = who->rlimits[k].soft, .rlim_max = who->rlimits[k].hard };

		if (setrlimit((int)who->rlimits[k].resource, &rl) < 0)
			child_fail(125, "cannot set rlimit %lu: %s", (unsigned long)who->rlimits[k].resource,
				   strerror(errno));
	}
}

static void apply_identity(const struct vmrt_run *who)
{
	gid_t groups[VMRT_MAX_GROUPS];

	apply_rlimits(who);

	if (!run.no_new_privs)
		apply_seccomp(); /* while CAP_SYS_ADMIN is still held (see apply_seccomp) */
	if (run.has_caps) { /* bounding set first: dropping needs CAP_SETPCAP */
		for (int c = 0; c < 64; c++)
			if (!(run.caps & (1ULL << c)) && prctl(PR_CAPBSET_READ, c, 0, 0, 0) >= 0 &&
			    prctl(PR_CAPBSET_DROP, c, 0, 0, 0) < 0)
				child_fail(125, "cannot drop capability %d: %s", c, strerror(errno));
	}
	for (size_t i = 0; i < who->ngroups; i++)
		groups[i] = (gid_t)who->groups[i];
	if (setgroups(who->ngroups, groups) < 0)
		child_fail(125, "setgroups: %s", strerror(errno));
	if (setgid((gid_t)who->gid) < 0)
		child_fail(125, "setgid %lu: %s", (unsigned long)who->gid, strerror(errno));
	if (setuid((uid_t)who->uid) < 0)
		child_fail(125, "setuid %lu: %s", (unsigned long)who->uid, strerror(errno));
	if (run.has_caps) {
		struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
		struct __user_cap_data_struct data[2];
		uint64_t keep = who->uid == 0 ? run.caps : 0;

		memset(data, 0, sizeof data);
		data[0].effective = data[0].permitted = (uint32_t)keep;
		data[1].effective = data[1].permitted = (uint32_t)(keep >> 32);
		(void)prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
		if (syscall(SYS_capset, &hdr, data) < 0)
			child_fail(125, "cannot set capabilities: %s", strerror(errno));
	}
	if (run.no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		child_fail(125, "cannot set no_new_privs: %s", strerror(errno));
}

/* What every container process (the main one and each exec) does first in its
 * child: default signals, the container cgroup, its own session, its stdio and,
 * with a terminal, that terminal as its controlling one. */
static void child_enter(const struct stdio *s, int tty)
{
	sigset_t all;

	sigemptyset(&all);
	sigprocmask(SIG_SETMASK, &all, NULL);
	signal(SIGPIPE, SIG_DFL);
	if (cgroup_ok && write_file(CGROUP "/cgroup.procs", "0") < 0)
		child_fail(125, "cannot join the container cgroup: %s", strerror(errno));
	if (setsid() < 0)
		child_fail(125, "setsid: %s", strerror(errno));
	if (dup2(s->child_in, 0) < 0 || dup2(s->child_out, 1) < 0 || dup2(s->child_err, 2) < 0)
		child_fail(125, "dup2: %s", strerror(errno));
	if (tty && ioctl(0, TIOCSCTTY, 0) < 0)
		child_fail(125, "cannot set the controlling terminal: %s", strerror(errno));
}

/* WALK_UPPER (walk.c): instead of the container's root and identity, the
 * process stays in the agent's mount namespace, where the writable layer's
 * upper dir is, and keeps only what reading all of it takes:
 * CAP_DAC_READ_SEARCH (every directory) and CAP_SYS_ADMIN (the trusted.*
 * xattr that marks an opaque directory), no_new_privs, and no fd of the
 * agent's: the error pipe's end goes too, its EOF the agent's STARTED. */
static void walk_enter(int content) __attribute__((noreturn));
static void walk_enter(int content)
{
	const uint64_t keep = 1ULL << CAP_DAC_READ_SEARCH | 1ULL << CAP_SYS_ADMIN;
	struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct data[2];

	if (chdir("/") < 0)
		child_fail(125, "walk: chdir /: %s", strerror(errno));
	for (int c = 0; c < 64; c++)
		if (!(keep & (1ULL << c)) && prctl(PR_CAPBSET_READ, c, 0, 0, 0) >= 0 &&
		    prctl(PR_CAPBSET_DROP, c, 0, 0, 0) < 0)
			child_fail(125, "walk: cannot drop capability %d: %s", c, strerror(errno));
	memset(data, 0, sizeof data);
	data[0].effective = data[0].permitted = (uint32_t)keep;
	data[1].effective = data[1].permitted = (uint32_t)(keep >> 32);
	(void)prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
	if (syscall(SYS_capset, &hdr, data) < 0)
		child_fail(125, "walk: cannot set capabilities: %s", strerror(errno));
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		child_fail(125, "walk: cannot set no_new_privs: %s", strerror(errno));
	if (syscall(SYS_close_range, 3u, ~0u, 0u) < 0)
		for (int fd = 3; fd < 4096; fd++)
			close(fd);
	errpipe_w = -1;
	walk_upper(content);
}

/* WALK_AFTER: the writable layer's walk with contents (VMRTWLK2), a child of
 * the agent's once the container's process has exited (its PID namespace, and
 * every process of the container with it, is gone: nothing changes the layer
 * meanwhile).  In the container's cgroup, with walk_enter's capabilities; its
 * stdout and stderr are pipes whose read ends go to s, as a container
 * process's.  Its pid, or -1. */
pid_t walk_spawn(struct stdio *s)
{
	static const struct vmrt_run plain; /* no terminal, no stdin */
	char msg[256], pts[8];
	pid_t pid;

	if (stdio_open(s, &plain, 0, pts, sizeof pts, msg, sizeof msg) < 0) {
		con("walk: %s", msg);
		return -1;
	}
	pid = fork();
	if (pid == 0) {
		child_enter(s, 0);
		walk_enter(1);
	}
	stdio_close_child(s);
	if (pid < 0) {
		con("walk: fork: %s", strerror(errno));
		stdio_close(s);
	}
	return pid;
}

void child_main(const struct stdio *s)
{
	char text[512];

	child_enter(s, run.tty);
	if (run.walk)
		walk_enter(run.walk_content);

	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
		child_fail(125, "cannot make mounts private: %s", strerror(errno));
	if (mount("proc", ROOT "/proc", "proc", MS_NOSUID | MS_NOEXEC | MS_NODEV, NULL) < 0)
		child_fail(125, "cannot mount /proc: %s", strerror(errno));
	/* switch_root style: move the container root over / in this mount
	 * namespace, then chroot, so nothing of the agent's root stays reachable */
	if (chdir(ROOT) < 0 || mount(ROOT, "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 ||
	    chdir("/") < 0)
		child_fail(125, "cannot enter the container root: %s", strerror(errno));

	/* a file that is a MOUNT target is the host's managed copy, bound
	 * there: writing it would go through the bind into the host's file */
	if (is_dir("/etc")) {
		snprintf(text, sizeof text, "%s\n", run.hostname);
		if (!is_mount_target("/etc/hostname"))
			write_etc("/etc/hostname", text);
		snprintf(text, sizeof text,
			 "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t%s\n",
			 run.hostname);
		if (!is_mount_target("/etc/hosts"))
			write_etc("/etc/hosts", text);
	}

	umask(022);
	if (chdir(run.cwd) < 0) {
		if (errno != ENOENT)
			child_fail(125, "cannot chdir to %s: %s", run.cwd, strerror(errno));
		if (mkdir_p(run.cwd, 0755) < 0)
			child_fail(125, "cannot create working directory %s: %s", run.cwd,
				   strerror(errno));
		if (chdir(run.cwd) < 0)
			child_fail(125, "cannot chdir to %s: %s", run.cwd, strerror(errno));
	}
	mask_paths();
	if (run.readonly && mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL) < 0)
		child_fail(125, "cannot make the root read-only: %s", strerror(errno));

	apply_identity(&run);

	/* everything above 2 closes on exec (the error pipe is O_CLOEXEC) */
	if (syscall(SYS_close_range, 3u, ~0u, 4u /* CLOSE_RANGE_CLOEXEC */) < 0) {
		for (int fd = 3; fd < 4096; fd++)
			if (fd != errpipe_w)
				close(fd);
	}
	apply_seccomp();
	child_exec(&run);
}

/* An exec process: forked by the agent into the container's PID namespace;
 * joins its cgroup and mount namespace (whose root is the container root:
 * it was moved over "/" there), then runs as the EXEC says. */
void exec_child_main(const struct stdio *s, const struct vmrt_run *r, int mntns)
{
	child_enter(s, r->tty);
	if (r->walk)
		walk_enter(r->walk_content);
	/* setns(CLONE_NEWNS) sets root and cwd to the namespace's root, looking
	 * down the mounts on it: the container root */
	if (setns(mntns, CLONE_NEWNS) < 0 || chdir("/") < 0)
		child_fail(125, "cannot enter the container's mounts: %s", strerror(errno));
	umask(022);
	if (chdir(r->cwd) < 0)
		child_fail(125, "cannot chdir to %s: %s", r->cwd, strerror(errno));
	apply_identity(r);
	if (syscall(SYS_close_range, 3u, ~0u, 4u /* CLOSE_RANGE_CLOEXEC */) < 0) {
		for (int fd = 3; fd < 4096; fd++)
			if (fd != errpipe_w)
				close(fd);
	}
	apply_seccomp(); /* the container's filter: an exec gets what its main process got */
	child_exec(r);
}

/* "oom_kill N" from a key/value file (memory.events, /proc/vmstat) */
static uint64_t read_oom_kill(const char *path)
{
	static char buf[32768];
	size_t got = 0;
	ssize_t n;
	char *p;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return 0;
	while (got < sizeof buf - 1 && (n = read(fd, buf + got, sizeof buf - 1 - got)) > 0)
		got += (size_t)n;
	close(fd);
	buf[got] = '\0';
	for (p = buf; p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
		if (strncmp(p, "oom_kill ", 9) == 0)
			return strtoull(p + 9, NULL, 10);
	return 0;
}

/* OOM kills that hit the container: its memory cgroup's count where the
 * cgroup could be set up, else the guest-wide one (CONFIG_VM_EVENT_COUNTERS). */
uint64_t oom_kills(void)
{
	if (cgroup_ok)
		return read_oom_kill(CGROUP "/memory.events");
	return read_oom_kill("/proc/vmstat");
}

/* What a child wrote to its close-on-exec error pipe: 0 if nothing (the exec
 * succeeded), else 1 with the code and the message. */
int read_errpipe(int fd, uint32_t *code, char *msg, size_t msglen)
{
	char buf[4 + 1024];
	size_t got = 0;

	for (;;) {
		ssize_t n = read(fd, buf + got, sizeof buf - got);
		if (n > 0) {
			got += (size_t)n;
			if (got == sizeof buf)
				break;
		} else if (n < 0 && errno == EINTR) {
			continue;
		} else {
			break;
		}
	}
	close(fd);
	if (got == 0)
		return 0;
	*code = 125;
	if (got >= 4)
		memcpy(code, buf, 4);
	if (got <= 4)
		snprintf(msg, msglen, "container setup failed");
	else
		snprintf(msg, msglen, "%.*s", (int)(got - 4), buf + 4);
	return 1;
}

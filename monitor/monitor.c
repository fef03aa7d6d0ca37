/* vmrt-monitor: the resident owner of one detached container (as Podman's conmon).
 *
 * vmrt sets a container up in Python and then execs this program in the same
 * process, so QEMU and virtiofsd (VM isolation) or the container's init
 * (process isolation) stay our children, and a running container costs a few
 * hundred KiB instead of an interpreter.  It logs the container's output as
 * Docker json-file lines, forwards signals, watches the VM's liveness, and
 * when the container is done it execs the finish command given after "--"
 * with HOW VALUE OOM DETAIL appended: Python does the teardown and the restart
 * policy.  Everything runs from one poll() loop and never blocks on a write
 * that could keep the container's output from being read.
 *
 * A VM from the warm pool (--adopted) was booted by the pool daemon, so its
 * QEMU and virtiofsd are the daemon's children, not ours: their end is seen on
 * pidfds instead of SIGCHLD, and their exit status is only known from the
 * files the daemon writes when it reaps them. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "proto.h"
#include "util.h"

#define LOG_PIECE (16 * 1024)   /* a longer partial line is logged in pieces (Docker) */
#define STDIN_CAP (64 * 1024)   /* attach bytes waiting for the container's stdin */
#define CTL_ROOM 4096           /* agent queue room kept for SIGNAL/PING/SHUTDOWN */
#define WQ_CAP (VMRT_FRAME_MAX + 2 * CTL_ROOM)
#define MAX_CLIENTS 16
#define CONSOLE_MAX (1 << 20)   /* the console log keeps the head (a guest may print forever) */
#define DRAIN_MS 5000           /* process: output read after the init is reaped */
#define GRACE_MS 2000           /* vm: QEMU's time to exit before SIGKILL */
#define AGENT_LOST_MS 1000      /* vm: wait for QEMU after the agent channel broke */
#define QEMU_LOST_MS 200        /* vm: agent bytes still read after QEMU was reaped */
#define STATUS_MS 200           /* adopted: the pool daemon's time to write an exit status */
#define KILLED_MS 5000          /* adopted: wait for a SIGKILLed QEMU we cannot waitpid */
#define CODE_UNKNOWN LONG_MIN   /* adopted: an exit status we did not see ("unknown") */
#define FORCE_KILL (SIGRTMIN + 3)

struct stream {
	int fd;           /* process mode: our read end; -1 once at EOF */
	const char *name; /* "stdout" or "stderr" */
	size_t len;       /* bytes of an unfinished line in buf */
	uint8_t buf[LOG_PIECE];
};

/* How the run ends, in vm mode: what to wait for before the finish command. */
enum end_kind {
	E_NONE,
	E_GRACE,      /* QEMU was asked to stop: SIGKILL at the deadline */
	E_AGENT_LOST, /* the channel broke: QEMU's exit decides "qemu" or "agent" */
	E_QEMU_LOST,  /* QEMU was reaped: read the agent's last frames until the deadline */
};

static struct {
	enum end_kind kind;
	int64_t deadline;
	const char *how;
	char value[32];
	int oom;
	char detail[1024];
} end;

/* command line */
static int vm;
static const char *cid = "?";
static char **finish_argv;
static int finish_argc;
static const char *dead_arg = "0", *start_arg = "0";
static double ping_s, dead_s, start_s;
static int stdin_open;
static int partial;    /* --partial: an unfinished line is logged as it comes (a terminal's prompt) */
static int stdin_once;
static int tty_mode;           /* process mode: out_s.fd is the terminal's master */
static const char *resize_path; /* --resize: "ROWS COLS", read at SIGWINCH (vmrt's resize) */
static void resize(void);
/* --health SECONDS: that often once the container runs, the finish command with vmrt.health
 * for vmrt.monitor and --health for --finish (vmrt's probe: it runs the check and records
 * the outcome), one at a time */
static int64_t health_ms, health_next = -1;
/* --finisher PATH: a vmrt fork server's socket (the API service's): the finish command is
 * asked of it (a forked process, no new interpreter); else, or if it does not answer, exec'd */
static const char *finisher;
static pid_t health_pid = -1; /* the first attach client's EOF closes the container's stdin (Docker's StdinOnce) */

static int sfd = -1, log_fd = -1, ready_fd = -1;
static int64_t now;
static struct stream out_s, err_s;
static int log_failed;
/* json-file's max-size/max-file (--log-max-size, --log-max-file): 0 = no cap */
static const char *log_path;
static int64_t log_max_size, log_size;
static long log_max_file = 1;

/* process mode */
static pid_t init_pid = -1;
static int init_done, init_status, killed, terms;
static int64_t drain_deadline;
static int stdin_fd = -1;
static uint8_t inq[STDIN_CAP];
static size_t inq_off, inq_len;

/* vm mode */
static pid_t qemu_pid = -1, vfs_pid = -1;
static int qemu_alive, vfs_alive;
static int agent_fd = -1, console_fd = -1, console_log = -1;
static size_t console_written;
static int started;
static int64_t start_deadline, last_rx, last_ping, ping_ms, dead_ms;
static uint64_t cookie;
static uint8_t rbuf[VMRT_FRAME_MAX];
static size_t rlen;
static uint8_t wq[WQ_CAP];
static size_t woff, wlen;

/* vm mode, adopted: QEMU and virtiofsd are watched through pidfds (-1 when not
 * adopted), and their statuses read from the pool daemon's files (or NULL) */
static int adopted;
static int qemu_pidfd = -1, vfs_pidfd = -1;
static const char *qemu_status, *vfs_status;
static int64_t qemu_ended, vfs_ended; /* when their end was seen */

/* attach */
static int listen_fd = -1, attach_dir = -1;
static const char *attach_name;
static int clients[MAX_CLIENTS];

static uint8_t scratch[16 * 1024];
static char jbuf[LOG_PIECE * 6 + 128]; /* worst case: every byte becomes \u00XX */

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	char prefix[96], buf[1024];
	va_list ap;
	size_t n;

	snprintf(prefix, sizeof prefix, "vmrt-monitor: %.64s: ", cid);
	va_start(ap, fmt);
	n = logline_format(buf, sizeof buf, prefix, fmt, ap);
	va_end(ap);
	(void)!write(2, buf, n);
}

static int write_all(int fd, const void *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		p = (const char *)p + w;
		n -= (size_t)w;
	}
	return 0;
}

/* ---------------------------------------------------------------- log */

/* The end of a record: its stream and UTC time.  The civil date is computed
 * here (H. Hinnant's days-to-civil): gmtime_r would link glibc's time zone
 * code (and sscanf, strtold ...), a third of the binary. */
static int utc_stamp(const char *stream, struct timespec ts, char *p, size_t n)
{
	int64_t days = ts.tv_sec / 86400, secs = ts.tv_sec % 86400;
	int64_t z = days + 719468, era = z / 146097;
	int64_t doe = z - era * 146097;
	int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
	int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100), mp = (5 * doy + 2) / 153;
	int64_t d = doy - (153 * mp + 2) / 5 + 1, m = mp < 10 ? mp + 3 : mp - 9;

	return snprintf(p, n, "\",\"stream\":\"%s\",\"time\":\"%04d-%02d-%02dT%02d:%02d:%02d.%06ldZ\"}\n",
			stream, (int)(yoe + era * 400 + (m <= 2)), (int)m, (int)d, (int)(secs / 3600),
			(int)(secs / 60 % 60), (int)(secs % 60), ts.tv_nsec / 1000);
}

/* max-size reached: the live file becomes container.log.1 (.1 -> .2 ..., the oldest
 * dropped; with max-file 1 it is dropped) and a new one is started, so a container
 * that prints without end holds at most max-file files of max-size on the host (a
 * record larger than max-size gets a file of its own).  Readers follow by inode. */
static void log_rotate(void)
{
	char from[PATH_MAX + 16], to[PATH_MAX + 16];
	struct stat st;

	if (log_fd >= 0)
		close(log_fd);
	log_fd = -1;
	if (log_max_file == 1 && unlink(log_path) < 0 && errno != ENOENT)
		say("cannot drop the full container log: %s", strerror(errno));
	for (long i = log_max_file - 1; i >= 1; i--) {
		if (i == 1)
			snprintf(from, sizeof from, "%s", log_path);
		else
			snprintf(from, sizeof from, "%s.%ld", log_path, i - 1);
		snprintf(to, sizeof to, "%s.%ld", log_path, i);
		if (rename(from, to) < 0 && errno != ENOENT)
			say("cannot rotate the container log %s: %s", from, strerror(errno));
	}
	/* O_TRUNC: if a rename failed, the cap still holds */
	log_fd = open(log_path, O_WRONLY | O_APPEND | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (log_fd < 0 && !log_failed) {
		log_failed = 1;
		say("cannot reopen the container log after rotating it: %s", strerror(errno));
	}
	log_size = log_fd >= 0 && fstat(log_fd, &st) == 0 ? (int64_t)st.st_size : 0;
}

/* One json-file record, in one write() so that a reader never sees half of it. */
static void log_record(const char *stream, const uint8_t *s, size_t n)
{
	static const char hex[] = "0123456789abcdef";
	char *p = stpcpy(jbuf, "{\"log\":\"");
	struct timespec ts;

	for (size_t i = 0; i < n;) {
		uint8_t c = s[i];
		size_t k;

		if (c >= 0x80) { /* valid multibyte sequences raw, each bad byte U+FFFD */
			k = vmrt_utf8_seq(s + i, n - i);
			if (k) {
				memcpy(p, s + i, k);
				p += k;
				i += k;
			} else {
				p = stpcpy(p, "\\ufffd");
				i++;
			}
			continue;
		}
		i++;
		switch (c) {
		case '"': p = stpcpy(p, "\\\""); break;
		case '\\': p = stpcpy(p, "\\\\"); break;
		case '\n': p = stpcpy(p, "\\n"); break;
		case '\r': p = stpcpy(p, "\\r"); break;
		case '\t': p = stpcpy(p, "\\t"); break;
		case '\b': p = stpcpy(p, "\\b"); break;
		case '\f': p = stpcpy(p, "\\f"); break;
		default:
			if (c < 0x20) {
				p = stpcpy(p, "\\u00");
				*p++ = hex[c >> 4];
				*p++ = hex[c & 15];
			} else {
				*p++ = (char)c;
			}
		}
	}
	clock_gettime(CLOCK_REALTIME, &ts);
	p += utc_stamp(stream, ts, p, (size_t)(jbuf + sizeof jbuf - p));
	if (log_max_size > 0 && log_path && log_size > 0 && log_size + (p - jbuf) > log_max_size)
		log_rotate();
	log_size += p - jbuf;
	if (log_fd >= 0 && write_all(log_fd, jbuf, (size_t)(p - jbuf)) < 0 && !log_failed) {
		log_failed = 1; /* once: a full disk would say it for every line */
		say("cannot write the container log: %s", strerror(errno));
	}
}

/* Log the complete lines among the n new bytes at s->buf + s->len; an
 * unfinished line that fills the buffer is logged as it is. */
static void stream_got(struct stream *s, size_t n)
{
	uint8_t *start = s->buf, *p = s->buf + s->len, *e = p + n, *nl;

	while ((nl = memchr(p, '\n', (size_t)(e - p)))) {
		log_record(s->name, start, (size_t)(nl + 1 - start));
		start = p = nl + 1;
	}
	s->len = (size_t)(e - start);
	if (s->len == LOG_PIECE) {
		log_record(s->name, s->buf, s->len);
		s->len = 0;
	} else if (start != s->buf) {
		memmove(s->buf, start, s->len);
	}
}

static void stream_feed(struct stream *s, const uint8_t *d, size_t n)
{
	while (n > 0) {
		size_t k = LOG_PIECE - s->len < n ? LOG_PIECE - s->len : n;

		memcpy(s->buf + s->len, d, k);
		stream_got(s, k);
		d += k;
		n -= k;
	}
}

static void stream_flush(struct stream *s)
{
	if (s->len)
		log_record(s->name, s->buf, s->len);
	s->len = 0;
}

static void stream_read(struct stream *s)
{
	ssize_t n = read(s->fd, s->buf + s->len, LOG_PIECE - s->len);

	if (n > 0) {
		stream_got(s, (size_t)n);
		if (partial)
			stream_flush(s);
		return;
	}
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	/* EOF; EIO from a pty master once the slave side is closed */
	stream_flush(s);
	close(s->fd);
	s->fd = -1;
}

/* ---------------------------------------------------------------- finish */

/* "ok" to the starting vmrt once the container's process runs.  A failure is told
 * by the finish command instead, after it has recorded the exit (so `vmrt ps`
 * right after a failed `vmrt run -d` never shows the container running): the
 * fd is passed on to it. */
static void ready_ok(void)
{
	if (ready_fd < 0)
		return;
	(void)!write(ready_fd, "ok\n", 3);
	close(ready_fd);
	ready_fd = -1;
}

/* A unix socket address for path, which may be longer than sun_path: a short /proc name of
 * its directory, opened O_PATH (chdir is not ours to change). Returns that directory's fd (the
 * caller closes it; *name is path's last part), or -1 with errno set. */
static int unix_addr(const char *path, struct sockaddr_un *sa, const char **name)
{
	char dir[4096];
	const char *slash = strrchr(path, '/');
	int fd;

	*name = slash ? slash + 1 : path;
	snprintf(dir, sizeof dir, "%.*s", slash ? (int)(slash - path) + (slash == path) : 1,
		 slash ? path : ".");
	fd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	*sa = (struct sockaddr_un){ .sun_family = AF_UNIX };
	if ((size_t)snprintf(sa->sun_path, sizeof sa->sun_path, "/proc/self/fd/%d/%s", fd, *name) >=
	    sizeof sa->sun_path) {
		close(fd);
		errno = ENAMETOOLONG;
		return -1;
	}
	return fd;
}

/* The finish command done by the --finisher server: it is sent our container's ID and the
 * finish arguments (NUL-separated) with our stderr, fd 3 if it is the ready pipe, and one end
 * of a socket pair whose EOF says it is done (what it writes first: its status, our exit
 * status). Returns only if the server could not be asked. */
static void finish_by_server(char **args, int with_ready)
{
	struct sockaddr_un sa;
	char buf[4096 + 64], code[16] = "";
	int sock, pair[2], fds[3], dir, nfds = 0;
	size_t len = 0;
	const char *name;

	dir = unix_addr(finisher, &sa, &name);
	if (dir < 0)
		return;
	for (int i = -1; i < 4; i++) { /* ID, HOW, VALUE, OOM, DETAIL */
		const char *s = i < 0 ? cid : args[i];
		size_t n;

		if (!s)
			s = "";
		n = strlen(s) + 1;

		if (len + n > sizeof buf) {
			close(dir);
			return;
		}
		memcpy(buf + len, s, n);
		len += n;
	}
	sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (sock < 0) {
		close(dir);
		return;
	}
	if (connect(sock, (struct sockaddr *)&sa, sizeof sa) < 0) {
		close(sock);
		close(dir);
		return;
	}
	close(dir);
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0) {
		close(sock);
		return;
	}
	fds[nfds++] = pair[1];
	fds[nfds++] = 2;
	if (with_ready)
		fds[nfds++] = 3;
	{
		union { char b[CMSG_SPACE(sizeof fds)]; struct cmsghdr align; } u;
		struct iovec iov = { .iov_base = buf, .iov_len = len };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b,
				     .msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds) };
		struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);

		memset(&u, 0, sizeof u);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
		memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfds);
		if (sendmsg(sock, &mh, MSG_NOSIGNAL) != (ssize_t)len) {
			close(sock);
			close(pair[0]);
			close(pair[1]);
			return;
		}
	}
	close(pair[1]);
	/* the server's answer: "ok" once it forked the finish (else it could not: exec it) */
	{
		char ok[8] = "";

		if (read(sock, ok, sizeof ok - 1) <= 0 || strcmp(ok, "ok")) {
			close(sock);
			close(pair[0]);
			return;
		}
	}
	close(sock);
	{
		size_t got = 0;
		ssize_t n;

		while ((n = read(pair[0], code + got, sizeof code - 1 - got)) > 0 ||
		       (n < 0 && errno == EINTR))
			if (n > 0)
				got += (size_t)n;
	}
	_exit(code[0] ? (int)strtol(code, NULL, 10) & 0xff : 0);
}

static void finish(const char *how, const char *value, int oom, const char *detail)
	__attribute__((noreturn));
static void finish(const char *how, const char *value, int oom, const char *detail)
{
	struct signalfd_siginfo si;
	sigset_t none;
	char **av;

	stream_flush(&out_s);
	stream_flush(&err_s);
	if (listen_fd >= 0)
		unlinkat(attach_dir, attach_name, 0);
	av = calloc((size_t)finish_argc + 6, sizeof *av);
	if (!av) {
		say("out of memory");
		_exit(125);
	}
	memcpy(av, finish_argv, (size_t)finish_argc * sizeof *av);
	av[finish_argc] = (char *)how;
	av[finish_argc + 1] = (char *)value;
	av[finish_argc + 2] = oom ? "1" : "0";
	av[finish_argc + 3] = (char *)detail;
	/* an unused ready pipe goes on as fd 3: the finish command tells the failure */
	av[finish_argc + 4] = "-1";
	if (ready_fd >= 0 && (ready_fd == 3 || dup2(ready_fd, 3) == 3) && fcntl(3, F_SETFD, 0) == 0)
		av[finish_argc + 4] = "3";
	/* Signals still queued were meant for a container that is gone; unblocked
	 * they would kill us before the finish command runs. */
	while (sfd >= 0 && read(sfd, &si, sizeof si) == sizeof si)
		;
	close_range(ready_fd >= 0 ? 4 : 3, ~0u, 0);
	if (finisher)
		finish_by_server(av + finish_argc, ready_fd >= 0);
	signal(SIGPIPE, SIG_DFL);
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	execv(av[0], av);
	say("cannot run %s: %s", av[0], strerror(errno));
	_exit(125);
}

/* Adopted, through the pidfd: once the pool daemon has reaped QEMU its PID may
 * be reused, and a signal by PID could hit another process. */
static void qemu_signal(int sig)
{
	if (qemu_pidfd >= 0)
		syscall(SYS_pidfd_send_signal, qemu_pidfd, sig, NULL, 0);
	else
		kill(qemu_pid, sig);
}

static void kill_qemu(void)
{
	if (qemu_alive)
		qemu_signal(SIGKILL);
}

/* Adopted: the process of pidfd is not ours to waitpid(); its pidfd turns
 * readable when it ends.  0 if it has not within ms. */
static int pidfd_wait(int pidfd, int ms)
{
	struct pollfd p = { .fd = pidfd, .events = POLLIN };
	int64_t until = now_ms() + ms, left;

	while ((left = until - now_ms()) > 0) {
		int n = poll(&p, 1, (int)left);

		if (n > 0)
			return 1;
		if (n < 0 && errno != EINTR)
			break;
	}
	return 0;
}

/* Adopted: the exit status the pool daemon wrote to path when it reaped the
 * process (a decimal exit code, or -signal), into value; 0 if none (yet). */
static int read_status(const char *path, char *value, size_t n)
{
	char buf[32], *e;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t k = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
	long v;

	if (fd >= 0)
		close(fd);
	if (k <= 0)
		return 0;
	buf[k] = '\0';
	errno = 0;
	v = strtol(buf, &e, 10);
	if (errno || e == buf || v < INT32_MIN || v > INT32_MAX)
		return 0;
	while (*e == '\n' || *e == ' ' || *e == '\t' || *e == '\r')
		e++;
	if (*e) /* not (all) written yet, or not a status */
		return 0;
	snprintf(value, n, "%ld", v);
	return 1;
}

/* Adopted: an "unknown" status of the process that ended the run becomes the
 * one its status file tells.  The daemon reaps it as we see its end and writes
 * the file just after, so it is waited for until STATUS_MS after that end
 * (after a QEMU_LOST wait, that time is already spent: one look). */
static void status_told(void)
{
	const char *path = NULL;
	int64_t since = 0;

	if (!strcmp(end.how, "qemu")) {
		path = qemu_status;
		since = qemu_ended;
	} else if (!strcmp(end.how, "virtiofsd")) {
		path = vfs_status;
		since = vfs_ended;
	}
	if (!path || strcmp(end.value, "unknown"))
		return;
	while (!read_status(path, end.value, sizeof end.value) && now_ms() < since + STATUS_MS)
		nanosleep(&(struct timespec){ .tv_nsec = 10 * 1000 * 1000 }, NULL);
}

/* vm mode: QEMU gone (killed now if need be), then the finish command. */
static void vm_finish(void) __attribute__((noreturn));
static void vm_finish(void)
{
	int st;

	if (qemu_alive) {
		qemu_signal(SIGKILL);
		if (!adopted)
			while (waitpid(qemu_pid, &st, 0) < 0 && errno == EINTR)
				;
		else if (qemu_pidfd >= 0 && !pidfd_wait(qemu_pidfd, KILLED_MS))
			say("QEMU (pid %d) did not end on SIGKILL", (int)qemu_pid);
		qemu_alive = 0;
	}
	if (adopted)
		status_told();
	finish(end.how, end.value, end.oom, end.detail);
}

static void set_end(enum end_kind kind, int64_t ms, const char *how, long value,
		    int oom, const char *detail)
{
	end.kind = kind;
	end.deadline = now + ms;
	end.how = how;
	if (value == CODE_UNKNOWN) /* adopted: status_told() may know it at the end */
		snprintf(end.value, sizeof end.value, "unknown");
	else
		snprintf(end.value, sizeof end.value, "%ld", value);
	end.oom = oom;
	snprintf(end.detail, sizeof end.detail, "%s", detail);
}

/* A failure of our own set-up: the container cannot be looked after. */
static void setup_fail(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void setup_fail(const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	int st;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	say("%s", msg);
	if (vm) {
		set_end(E_NONE, 0, "error", 125, 0, msg);
		vm_finish();
	}
	if (init_pid > 0 && !init_done && kill(init_pid, SIGKILL) == 0)
		while (waitpid(init_pid, &st, 0) < 0 && errno == EINTR)
			;
	finish("error", "125", 0, msg);
}

/* ---------------------------------------------------------------- agent */

/* Make room for len more bytes at wq + wlen; 0 if there is none. */
static int wq_room(size_t len)
{
	if (WQ_CAP - wlen >= len)
		return 1;
	memmove(wq, wq + woff, wlen - woff);
	wlen -= woff;
	woff = 0;
	return WQ_CAP - wlen >= len;
}

static void agent_flush(void)
{
	while (agent_fd >= 0 && woff < wlen) {
		ssize_t n = write(agent_fd, wq + woff, wlen - woff);
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return;
		if (n <= 0)
			break; /* the read side sees the channel close and decides */
		woff += (size_t)n;
	}
	woff = wlen = 0;
}

static void agent_send(uint8_t type, const void *payload, size_t len)
{
	if (agent_fd < 0)
		return;
	if (!wq_room(VMRT_HDR_LEN + len)) { /* the agent reads nothing: liveness decides */
		say("agent queue full: frame 0x%02x dropped", type);
		return;
	}
	vmrt_frame_header(wq + wlen, type, (uint32_t)len);
	if (len)
		memcpy(wq + wlen + VMRT_HDR_LEN, payload, len);
	wlen += VMRT_HDR_LEN + len;
	agent_flush();
}

static void agent_signal(uint32_t sig)
{
	uint8_t p[4];

	vmrt_put32(p, sig);
	agent_send(VMRT_SIGNAL, p, sizeof p);
}

/* The channel closed, or carried something that is not the protocol. */
static void agent_lost(const char *why)
{
	close(agent_fd);
	agent_fd = -1;
	woff = wlen = 0;
	if (end.kind == E_QEMU_LOST)
		vm_finish();
	if (end.kind == E_NONE) /* did QEMU go down with it? */
		set_end(E_AGENT_LOST, AGENT_LOST_MS, "agent", 0, 0, why);
}

static void agent_frame(const struct vmrt_frame *f)
{
	const uint8_t *p = f->payload;

	switch (f->type) {
	case VMRT_STARTED:
		if (started || end.kind != E_NONE)
			break;
		started = 1;
		last_rx = last_ping = now;
		ready_ok();
		resize(); /* one asked for before the start (its signal came too early) */
		break;
	case VMRT_STDOUT:
	case VMRT_STDERR:
		stream_feed(f->type == VMRT_STDOUT ? &out_s : &err_s, p, f->len);
		if (partial)
			stream_flush(f->type == VMRT_STDOUT ? &out_s : &err_s);
		break;
	case VMRT_EXIT:
		if (end.kind == E_QEMU_LOST) {
			set_end(E_QEMU_LOST, 0, "exit", (long)vmrt_get32(p), vmrt_get32(p + 8) & 1, "");
			vm_finish();
		}
		if (end.kind != E_NONE)
			break; /* e.g. killed: it stays killed */
		set_end(E_GRACE, GRACE_MS, "exit", (long)vmrt_get32(p), vmrt_get32(p + 8) & 1, "");
		qemu_signal(SIGTERM);
		break;
	case VMRT_ERROR: {
		char msg[sizeof end.detail];
		size_t n = 0;

		if (end.kind != E_NONE)
			break;
		/* The guest's text goes on as DETAIL: valid UTF-8 (each bad byte U+FFFD,
		 * never cut inside a character), its controls escaped where it is shown. */
		for (size_t i = 4; i < f->len;) {
			size_t k = p[i] < 0x80 ? 1 : vmrt_utf8_seq(p + i, f->len - i);
			size_t w = k ? k : 3;

			if (n + w > sizeof msg - 1)
				break;
			memcpy(msg + n, k ? (const char *)p + i : "\xef\xbf\xbd", w);
			n += w;
			i += k ? k : 1;
		}
		msg[n] = '\0';
		set_end(E_GRACE, GRACE_MS, "error", (long)vmrt_get32(p), 0, msg);
		qemu_signal(SIGTERM);
		break;
	}
	default: /* HELLO, PONG: any byte received was already counted as life */
		break;
	}
}

static void agent_read(void)
{
	ssize_t n = read(agent_fd, rbuf + rlen, sizeof rbuf - rlen);
	size_t off = 0;

	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) {
		agent_lost(n == 0 ? "guest agent channel closed" : "guest agent channel failed");
		return;
	}
	last_rx = now;
	rlen += (size_t)n;
	for (;;) {
		struct vmrt_frame f;
		char err[256], msg[300];
		long k = vmrt_frame_parse(rbuf + off, rlen - off, VMRT_TO_HOST, &f, err, sizeof err);

		if (k == 0)
			break;
		if (k < 0) {
			snprintf(msg, sizeof msg, "agent protocol error: %s", err);
			agent_lost(msg);
			return;
		}
		agent_frame(&f);
		off += (size_t)k;
	}
	memmove(rbuf, rbuf + off, rlen - off);
	rlen -= off;
}

static void console_read(void)
{
	ssize_t n = read(console_fd, scratch, sizeof scratch);

	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) {
		close(console_fd);
		console_fd = -1;
		return;
	}
	if (console_log >= 0 && console_written < CONSOLE_MAX) {
		size_t k = CONSOLE_MAX - console_written < (size_t)n ? CONSOLE_MAX - console_written : (size_t)n;

		(void)!write_all(console_log, scratch, k);
		console_written += k;
	}
}

/* ---------------------------------------------------------------- children */

/* vm mode: QEMU or virtiofsd ended with code (exit code or -signal;
 * CODE_UNKNOWN when adopted, its end seen on its pidfd). */
static void vm_ended(pid_t pid, long code)
{
	if (pid == qemu_pid && qemu_alive) {
		qemu_alive = 0;
		if (end.kind == E_GRACE)
			vm_finish();
		if (end.kind == E_AGENT_LOST || agent_fd < 0) {
			set_end(E_NONE, 0, "qemu", code, 0, "");
			vm_finish();
		}
		set_end(E_QEMU_LOST, QEMU_LOST_MS, "qemu", code, 0, "");
	} else if (pid == vfs_pid && vfs_alive) {
		vfs_alive = 0;
		if (end.kind == E_NONE && qemu_alive) {
			set_end(E_NONE, 0, "virtiofsd", code, 0, "");
			vm_finish();
		}
	}
}

static void on_reaped(pid_t pid, int st)
{
	int code = WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);

	if (pid == health_pid) {
		health_pid = -1;
		health_next = now + health_ms;
		return;
	}
	if (!vm) {
		if (pid != init_pid || init_done)
			return;
		init_done = 1;
		init_status = code < 0 ? 128 - code : code;
		drain_deadline = now + DRAIN_MS;
		return;
	}
	vm_ended(pid, code);
	/* anything else was reparented to us (subreaper): reaped, nothing more */
}

/* Adopted: a pidfd turned readable, its process ended (the pool daemon reaps
 * it, and may tell its status in a file). */
static void on_pidfd(pid_t pid, int64_t *ended)
{
	*ended = now;
	vm_ended(pid, CODE_UNKNOWN);
}

static void reap(void)
{
	pid_t pid;
	int st;

	while ((pid = waitpid(-1, &st, WNOHANG)) > 0)
		on_reaped(pid, st);
}

/* ---------------------------------------------------------------- signals */

static int forwarded(int sig)
{
	return sig == SIGTERM || sig == SIGINT || sig == SIGHUP || sig == SIGQUIT ||
	       sig == SIGUSR1 || sig == SIGUSR2;
}

/* SIGWINCH: vmrt wrote the terminal's new size to the --resize file (root's, in the run
 * dir): the container's terminal takes it (process mode: our master; VM: the agent's). */
static void resize(void)
{
	char buf[32] = "";
	unsigned rows, cols;
	uint8_t p[4];
	ssize_t n;
	int fd;

	if (!resize_path || (fd = open(resize_path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)) < 0)
		return;
	n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n <= 0 || sscanf(buf, "%u %u", &rows, &cols) != 2 || rows > 0xffff || cols > 0xffff)
		return;
	if (!vm && tty_mode && out_s.fd >= 0) {
		struct winsize ws = { .ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols };

		ioctl(out_s.fd, TIOCSWINSZ, &ws);
	} else if (vm && started && end.kind == E_NONE) {
		vmrt_put16(p, (uint16_t)rows);
		vmrt_put16(p + 2, (uint16_t)cols);
		agent_send(VMRT_RESIZE, p, sizeof p);
	}
}

static void on_signal(int sig)
{
	int force = sig == FORCE_KILL ||
		    ((sig == SIGTERM || sig == SIGINT) && ++terms >= 2);

	if (sig == SIGCHLD) {
		reap();
	} else if (sig == SIGWINCH) {
		resize();
	} else if (!vm) {
		if (init_done)
			return;
		if (force) {
			kill(init_pid, SIGKILL);
			killed = 1;
		} else if (forwarded(sig)) {
			kill(init_pid, sig);
		}
	} else if (end.kind != E_NONE) {
		if (sig == FORCE_KILL)
			kill_qemu(); /* hurry up a stop in progress */
	} else if (!started) { /* nothing to pass it to yet: the start is off */
		kill_qemu();
		set_end(E_NONE, 0, "interrupted", sig, 0, "");
		vm_finish();
	} else if (force) {
		agent_send(VMRT_SHUTDOWN, NULL, 0);
		set_end(E_GRACE, GRACE_MS, "killed", 137, 0, "");
	} else if (forwarded(sig)) {
		agent_signal((uint32_t)sig);
	}
}

static void signals_read(void)
{
	struct signalfd_siginfo si;

	while (read(sfd, &si, sizeof si) == sizeof si)
		on_signal((int)si.ssi_signo);
}

/* ---------------------------------------------------------------- attach */

static void attach_listen(const char *path)
{
	struct sockaddr_un sa;

	attach_dir = unix_addr(path, &sa, &attach_name);
	if (attach_dir < 0) {
		say("cannot listen on %s: %s", path, strerror(errno));
		return;
	}
	unlinkat(attach_dir, attach_name, 0);
	listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (listen_fd < 0 || bind(listen_fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
	    listen(listen_fd, MAX_CLIENTS) < 0) {
		say("cannot listen on %s: %s", path, strerror(errno));
		if (listen_fd >= 0)
			close(listen_fd);
		listen_fd = -1;
	}
}

static void attach_accept(void)
{
	int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

	if (fd < 0)
		return;
	for (int i = 0; i < MAX_CLIENTS; i++) {
		if (clients[i] < 0) {
			clients[i] = fd;
			return;
		}
	}
	close(fd); /* too many: the client sees its connection closed */
}

/* Whether attach clients may be read: only with room for what they send. */
static int stdin_room(void)
{
	if (!vm)
		return stdin_fd < 0 || inq_len == 0;
	return agent_fd < 0 || !stdin_open || wlen - woff <= CTL_ROOM;
}

static void stdin_flush(void)
{
	while (stdin_fd >= 0 && inq_off < inq_len) {
		ssize_t n = write(stdin_fd, inq + inq_off, inq_len - inq_off);
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return;
		if (n <= 0) { /* EPIPE: the container closed its stdin */
			close(stdin_fd);
			stdin_fd = -1;
			break;
		}
		inq_off += (size_t)n;
	}
	inq_off = inq_len = 0;
}

/* --stdin-once: the container's stdin ends (what was queued was written first: clients are
 * read only with nothing queued), as Docker's StdinOnce after its attach's EOF. */
static void stdin_close(void)
{
	stdin_once = 0;
	if (!vm && stdin_fd >= 0) {
		close(stdin_fd);
		stdin_fd = -1;
	} else if (vm && stdin_open) {
		agent_send(VMRT_STDIN_CLOSE, NULL, 0);
		stdin_open = 0;
	}
}

static void client_read(int i)
{
	uint8_t *dst = scratch; /* no stdin any more: read and drop */
	size_t room = sizeof scratch;
	ssize_t n;

	if (!vm && stdin_fd >= 0) {
		dst = inq;
		room = sizeof inq;
	} else if (vm && stdin_open && agent_fd >= 0 && wq_room(VMRT_FRAME_MAX)) {
		dst = wq + wlen + VMRT_HDR_LEN;
		room = VMRT_MAX_PAYLOAD;
	}
	n = read(clients[i], dst, room);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) { /* a client's EOF: the container's stdin stays open, unless --stdin-once */
		close(clients[i]);
		clients[i] = -1;
		if (stdin_once && n == 0)
			stdin_close();
	} else if (dst == inq) {
		inq_len = (size_t)n;
		stdin_flush();
	} else if (dst != scratch) {
		vmrt_frame_header(wq + wlen, VMRT_STDIN, (uint32_t)n);
		wlen += VMRT_HDR_LEN + (size_t)n;
		agent_flush();
	}
}

/* ---------------------------------------------------------------- loop */

enum {
	F_SIG, F_OUT, F_ERR, F_STDIN, F_AGENT, F_CONSOLE, F_QEMU, F_VFS, F_LISTEN, F_CLIENT,
	NFDS = F_CLIENT + MAX_CLIENTS
};

static void deadline(int64_t *next, int64_t t)
{
	if (*next < 0 || t < *next)
		*next = t;
}

/* The health probe: the finish command's argv (see health_ms), stdio on
 * /dev/null but stderr (our log), none of our fds, our signals unblocked. */
static void health_probe(void)
{
	char **av = calloc((size_t)finish_argc + 1, sizeof *av);
	sigset_t none;
	pid_t pid;

	if (!av)
		return;
	for (int i = 0; i < finish_argc; i++)
		av[i] = !strcmp(finish_argv[i], "--finish") ? "--health" :
			!strcmp(finish_argv[i], "vmrt.monitor") ? "vmrt.health" : finish_argv[i];
	pid = fork();
	if (pid == 0) {
		int null = open("/dev/null", O_RDWR | O_CLOEXEC);

		if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0)
			_exit(125);
		close_range(3, ~0u, 0);
		signal(SIGPIPE, SIG_DFL);
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		execv(av[0], av);
		_exit(127);
	}
	free(av);
	if (pid < 0) {
		say("cannot start the health probe: %s", strerror(errno));
		health_next = now + health_ms;
		return;
	}
	health_pid = pid;
}

/* Act on the clock; returns the poll timeout in ms (-1: none). */
static int timers(void)
{
	int64_t next = -1;

	if (health_ms > 0 && health_pid < 0 && (vm ? started && end.kind == E_NONE : !init_done)) {
		if (health_next < 0)
			health_next = now + health_ms; /* the first check one interval after the start */
		if (now >= health_next)
			health_probe();
		else
			deadline(&next, health_next);
	}

	if (!vm) {
		if (init_done && ((out_s.fd < 0 && err_s.fd < 0) || now >= drain_deadline)) {
			char v[16];

			snprintf(v, sizeof v, "%d", init_status);
			if (killed)
				finish("killed", "137", 0, "");
			finish("exit", v, 0, "");
		}
		if (init_done)
			deadline(&next, drain_deadline);
	} else if (end.kind != E_NONE) {
		if (now >= end.deadline)
			vm_finish(); /* GRACE: SIGKILL; AGENT_LOST: "agent"; QEMU_LOST: done reading */
		deadline(&next, end.deadline);
	} else if (!started) {
		if (start_s > 0 && now >= start_deadline) {
			kill_qemu();
			end.how = "timeout";
			snprintf(end.value, sizeof end.value, "%s", start_arg);
			vm_finish();
		}
		if (start_s > 0)
			deadline(&next, start_deadline);
	} else if (dead_ms > 0) {
		if (now - last_rx >= dead_ms) {
			kill_qemu();
			end.how = "hung";
			snprintf(end.value, sizeof end.value, "%s", dead_arg);
			vm_finish();
		}
		if (now - last_ping >= ping_ms) {
			uint8_t c[8];

			vmrt_put64(c, ++cookie);
			agent_send(VMRT_PING, c, sizeof c);
			last_ping = now;
		}
		deadline(&next, last_rx + dead_ms);
		deadline(&next, last_ping + ping_ms);
	}
	if (next < 0)
		return -1;
	return next - now > 60000 ? 60000 : (int)(next - now);
}

static void loop(void)
{
	struct pollfd pfd[NFDS];

	for (;;) {
		int timeout, room, n;
		int64_t before;

		timeout = timers();
		room = stdin_room();
		pfd[F_SIG] = (struct pollfd){ .fd = sfd, .events = POLLIN };
		pfd[F_OUT] = (struct pollfd){ .fd = out_s.fd, .events = POLLIN };
		pfd[F_ERR] = (struct pollfd){ .fd = err_s.fd, .events = POLLIN };
		pfd[F_STDIN] = (struct pollfd){ .fd = inq_len ? stdin_fd : -1, .events = POLLOUT };
		pfd[F_AGENT] = (struct pollfd){ .fd = agent_fd,
						.events = POLLIN | (wlen > woff ? POLLOUT : 0) };
		pfd[F_CONSOLE] = (struct pollfd){ .fd = console_fd, .events = POLLIN };
		/* adopted: an ended process's pidfd stays readable, so it is left out */
		pfd[F_QEMU] = (struct pollfd){ .fd = qemu_alive ? qemu_pidfd : -1, .events = POLLIN };
		pfd[F_VFS] = (struct pollfd){ .fd = vfs_alive ? vfs_pidfd : -1, .events = POLLIN };
		pfd[F_LISTEN] = (struct pollfd){ .fd = listen_fd, .events = POLLIN };
		/* a client not to be read is left out altogether: its POLLHUP would spin */
		for (int i = 0; i < MAX_CLIENTS; i++)
			pfd[F_CLIENT + i] = (struct pollfd){ .fd = room ? clients[i] : -1, .events = POLLIN };

		before = now;
		n = poll(pfd, NFDS, timeout);
		now = now_ms();
		if (n < 0 && errno != EINTR)
			setup_fail("poll: %s", strerror(errno));
		/* Held up far longer than asked (stopped, starved): nothing could be
		 * read meanwhile, which says nothing about the agent. */
		if (timeout >= 0 && now - before > timeout + 1000 && last_rx < now)
			last_rx = now;
		if (n <= 0)
			continue;
		if (pfd[F_OUT].revents)
			stream_read(&out_s);
		if (pfd[F_ERR].revents)
			stream_read(&err_s);
		if (pfd[F_STDIN].revents)
			stdin_flush();
		if (pfd[F_AGENT].revents & POLLOUT)
			agent_flush();
		if (pfd[F_AGENT].revents & ~POLLOUT && agent_fd >= 0)
			agent_read();
		if (pfd[F_CONSOLE].revents)
			console_read();
		if (pfd[F_LISTEN].revents)
			attach_accept();
		for (int i = 0; i < MAX_CLIENTS; i++)
			if (pfd[F_CLIENT + i].revents && clients[i] >= 0 && stdin_room())
				client_read(i);
		/* after the agent, as SIGCHLD: its last frames (EXIT) were read first */
		if (pfd[F_QEMU].revents && qemu_alive)
			on_pidfd(qemu_pid, &qemu_ended);
		if (pfd[F_VFS].revents && vfs_alive)
			on_pidfd(vfs_pid, &vfs_ended);
		if (pfd[F_SIG].revents)
			signals_read();
	}
}

/* ---------------------------------------------------------------- set-up */

static void usage(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void usage(const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	say("%s", msg);
	exit(125);
}

static long number(const char *opt, const char *s, long min)
{
	char *e;
	long v;

	errno = 0;
	v = strtol(s, &e, 10);
	if (errno || e == s || *e || v < min || v > INT32_MAX)
		usage("bad value for --%s: %s", opt, s);
	return v;
}

static int64_t log_bytes(const char *opt, const char *s)
{
	char *e;
	long long v;

	errno = 0;
	v = strtoll(s, &e, 10);
	if (errno || e == s || *e || v < 1)
		usage("bad value for --%s: %s", opt, s);
	return (int64_t)v;
}

static double seconds(const char *opt, const char *s)
{
	char *e;
	double v = strtod(s, &e);

	if (e == s || *e || !(v >= 0 && v < 1e9))
		usage("bad value for --%s: %s", opt, s);
	return v;
}

/* One of our fds, made non-blocking: none of our reads or writes may wait. */
static int our_fd(const char *opt, long fd)
{
	int fl = fcntl((int)fd, F_GETFL);

	if (fl < 0 || fcntl((int)fd, F_SETFL, fl | O_NONBLOCK) < 0 ||
	    fcntl((int)fd, F_SETFD, FD_CLOEXEC) < 0)
		usage("--%s %ld: %s", opt, fd, strerror(errno));
	return (int)fd;
}

/* Adopted: a pidfd for a VM process that is not our child, so that its end is
 * seen and no signal meant for it hits a reused PID.  One already gone is not
 * alive: nothing is sent to its PID on the way out. */
static int adopt(const char *opt, pid_t pid, int *alive)
{
	int fd = (int)syscall(SYS_pidfd_open, pid, 0);
	int e = errno;

	if (fd < 0) {
		if (e == ESRCH)
			*alive = 0;
		setup_fail("--%s %d: pidfd_open: %s", opt, (int)pid, strerror(e));
	}
	return fd;
}

/* A child we supervise must be ours to wait for, or its end would go unseen. */
static void our_child(const char *opt, pid_t pid)
{
	siginfo_t si;

	if (waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG | WNOWAIT) < 0)
		usage("--%s %d: %s", opt, (int)pid, errno == ECHILD ? "not our child" : strerror(errno));
}

static int open_log(const char *opt, const char *path)
{
	int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);

	if (fd < 0)
		say("cannot open %s %s: %s", opt, path, strerror(errno));
	return fd;
}

static void load_run_frame(const char *path)
{
	struct vmrt_frame f;
	char err[256];
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n = fd < 0 ? -1 : read(fd, wq, sizeof wq);

	if (fd >= 0)
		close(fd);
	if (n < 0)
		setup_fail("cannot read the RUN frame %s: %s", path, strerror(errno));
	if (vmrt_frame_parse(wq, (size_t)n, VMRT_TO_AGENT, &f, err, sizeof err) != n ||
	    f.type != VMRT_RUN)
		setup_fail("%s does not hold one RUN frame", path);
	wlen = (size_t)n;
}

/* in the order of options[] */
enum {
	O_MODE = 256, O_ID, O_LOG, O_ATTACH, O_INIT, O_STDOUT, O_STDERR, O_TTY, O_STDIN,
	O_AGENT, O_CONSOLE, O_CONSOLE_LOG, O_QEMU, O_VIRTIOFSD, O_RUN_FRAME, O_READY,
	O_STDIN_OPEN, O_PING, O_DEAD, O_START_TIMEOUT, O_ADOPTED, O_QEMU_STATUS,
	O_VIRTIOFSD_STATUS, O_LOG_MAX_SIZE, O_LOG_MAX_FILE, O_STDIN_ONCE, O_PARTIAL, O_RESIZE, O_HEALTH, O_FINISHER,
};

static const struct option options[] = {
	{ "mode", required_argument, NULL, O_MODE },
	{ "id", required_argument, NULL, O_ID },
	{ "log", required_argument, NULL, O_LOG },
	{ "attach", required_argument, NULL, O_ATTACH },
	{ "init", required_argument, NULL, O_INIT },
	{ "stdout", required_argument, NULL, O_STDOUT },
	{ "stderr", required_argument, NULL, O_STDERR },
	{ "tty", required_argument, NULL, O_TTY },
	{ "stdin", required_argument, NULL, O_STDIN },
	{ "agent", required_argument, NULL, O_AGENT },
	{ "console", required_argument, NULL, O_CONSOLE },
	{ "console-log", required_argument, NULL, O_CONSOLE_LOG },
	{ "qemu", required_argument, NULL, O_QEMU },
	{ "virtiofsd", required_argument, NULL, O_VIRTIOFSD },
	{ "run-frame", required_argument, NULL, O_RUN_FRAME },
	{ "ready", required_argument, NULL, O_READY },
	{ "stdin-open", no_argument, NULL, O_STDIN_OPEN },
	{ "ping", required_argument, NULL, O_PING },
	{ "dead", required_argument, NULL, O_DEAD },
	{ "start-timeout", required_argument, NULL, O_START_TIMEOUT },
	{ "adopted", no_argument, NULL, O_ADOPTED },
	{ "qemu-status", required_argument, NULL, O_QEMU_STATUS },
	{ "virtiofsd-status", required_argument, NULL, O_VIRTIOFSD_STATUS },
	{ "log-max-size", required_argument, NULL, O_LOG_MAX_SIZE },
	{ "log-max-file", required_argument, NULL, O_LOG_MAX_FILE },
	{ "stdin-once", no_argument, NULL, O_STDIN_ONCE },
	{ "partial", no_argument, NULL, O_PARTIAL },
	{ "resize", required_argument, NULL, O_RESIZE },
	{ "health", required_argument, NULL, O_HEALTH },
	{ "finisher", required_argument, NULL, O_FINISHER },
	{ NULL, 0, NULL, 0 },
};

int main(int argc, char **argv)
{
	const char *mode = NULL, *log = NULL, *attach = NULL, *console_path = NULL, *run_frame = NULL;
	long num[O_START_TIMEOUT + 1]; /* fds and pids, by option */
	int c, pipes;

	/* Logs and attach.sock hold a tenant's data: root's alone even if the caller
	 * forgot (vmrt/fsmode.py). */
	umask(077);
	for (size_t i = 0; i < sizeof num / sizeof *num; i++)
		num[i] = -1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "+:", options, NULL)) != -1) {
		const char *name = c >= O_MODE ? options[c - O_MODE].name : "";

		switch (c) {
		case O_MODE: mode = optarg; break;
		case O_ID: cid = optarg; break;
		case O_LOG: log = optarg; break;
		case O_ATTACH: attach = optarg; break;
		case O_CONSOLE_LOG: console_path = optarg; break;
		case O_RUN_FRAME: run_frame = optarg; break;
		case O_STDIN_OPEN: stdin_open = 1; break;
		case O_STDIN_ONCE: stdin_once = 1; break;
		case O_PARTIAL: partial = 1; break;
		case O_RESIZE: resize_path = optarg; break;
		case O_FINISHER: finisher = optarg; break;
		case O_HEALTH:
			health_ms = (int64_t)(seconds(name, optarg) * 1000);
			if (health_ms > 0 && health_ms < 100)
				health_ms = 100; /* a probe is a new interpreter: not in a loop */
			break;
		case O_PING: ping_s = seconds(name, optarg); break;
		case O_DEAD: dead_s = seconds(name, optarg); dead_arg = optarg; break;
		case O_START_TIMEOUT: start_s = seconds(name, optarg); start_arg = optarg; break;
		case O_ADOPTED: adopted = 1; break;
		case O_QEMU_STATUS: qemu_status = optarg; break;
		case O_VIRTIOFSD_STATUS: vfs_status = optarg; break;
		case O_LOG_MAX_SIZE: log_max_size = log_bytes(name, optarg); break;
		case O_LOG_MAX_FILE: log_max_file = number(name, optarg, 1); break;
		case O_INIT: case O_QEMU: case O_VIRTIOFSD:
			num[c] = number(name, optarg, 1);
			break;
		case O_STDOUT: case O_STDERR: case O_TTY: case O_STDIN:
		case O_AGENT: case O_CONSOLE: case O_READY:
			num[c] = our_fd(name, number(name, optarg, 0));
			break;
		case ':':
			usage("option %s needs a value", argv[optind - 1]);
		default:
			usage("unknown option %s", argv[optind - 1]);
		}
	}
	if (optind < 2 || strcmp(argv[optind - 1], "--") || optind >= argc)
		usage("no finish command after --");
	finish_argv = argv + optind;
	finish_argc = argc - optind;
	if (!mode || (strcmp(mode, "process") && strcmp(mode, "vm")))
		usage("--mode must be process or vm");
	if (!log)
		usage("--log is required");
	if (strlen(log) >= PATH_MAX || log_max_file > 1000)
		usage("bad --log or --log-max-file");
	log_path = log;
	vm = !strcmp(mode, "vm");
	pipes = num[O_STDOUT] >= 0 || num[O_STDERR] >= 0;
	if (!vm && (num[O_INIT] < 0 || (num[O_TTY] >= 0) == pipes ||
		    (pipes && (num[O_STDOUT] < 0 || num[O_STDERR] < 0))))
		usage("process mode needs --init and --tty, or --stdout and --stderr");
	/* --virtiofsd is optional: a VM restored from a snapshot shares over 9p, in QEMU */
	if (vm && (num[O_AGENT] < 0 || num[O_QEMU] < 0 || !run_frame))
		usage("vm mode needs --agent, --qemu and --run-frame");
	if (!vm && adopted)
		usage("--adopted is for vm mode");
	if (!adopted && (qemu_status || vfs_status))
		usage("--qemu-status and --virtiofsd-status need --adopted");

	/* Set before any child can be reaped; kept across exec, but not ours to assume. */
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	{
		sigset_t set;

		sigemptyset(&set);
		sigaddset(&set, SIGTERM);
		sigaddset(&set, SIGINT);
		sigaddset(&set, SIGHUP);
		sigaddset(&set, SIGQUIT);
		sigaddset(&set, SIGUSR1);
		sigaddset(&set, SIGUSR2);
		sigaddset(&set, SIGCHLD);
		sigaddset(&set, SIGWINCH);
		sigaddset(&set, FORCE_KILL);
		sigprocmask(SIG_BLOCK, &set, NULL);
		signal(SIGPIPE, SIG_IGN);
		sfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
		if (sfd < 0)
			usage("signalfd: %s", strerror(errno));
	}
	out_s = (struct stream){ .fd = -1, .name = "stdout" };
	err_s = (struct stream){ .fd = -1, .name = "stderr" };
	for (int i = 0; i < MAX_CLIENTS; i++)
		clients[i] = -1;
	ready_fd = (int)num[O_READY];
	now = now_ms();
	if (vm) {
		qemu_pid = (pid_t)num[O_QEMU];
		vfs_pid = (pid_t)num[O_VIRTIOFSD]; /* -1: none */
		qemu_alive = 1;
		vfs_alive = vfs_pid > 0;
		if (adopted) {
			qemu_pidfd = adopt("qemu", qemu_pid, &qemu_alive);
			if (vfs_alive)
				vfs_pidfd = adopt("virtiofsd", vfs_pid, &vfs_alive);
		} else {
			our_child("qemu", qemu_pid);
			if (vfs_alive)
				our_child("virtiofsd", vfs_pid);
		}
		agent_fd = (int)num[O_AGENT];
		console_fd = (int)num[O_CONSOLE];
		start_deadline = now + (int64_t)(start_s * 1000);
		dead_ms = (int64_t)(dead_s * 1000);
		ping_ms = ping_s > 0 && ping_s * 1000 < dead_ms / 2 ? (int64_t)(ping_s * 1000) : dead_ms / 2;
		if (ping_ms < 50)
			ping_ms = 50;
		if (console_path) {
			struct stat st;

			console_log = open_log("--console-log", console_path);
			if (console_log >= 0 && fstat(console_log, &st) == 0)
				console_written = (size_t)st.st_size; /* the head written before us counts */
		}
		end.how = "";
	} else {
		init_pid = (pid_t)num[O_INIT];
		our_child("init", init_pid);
		out_s.fd = (int)(num[O_TTY] >= 0 ? num[O_TTY] : num[O_STDOUT]);
		tty_mode = num[O_TTY] >= 0;
		resize(); /* one asked for before the hand-off (its signal came too early) */
		err_s.fd = (int)num[O_STDERR];
		stdin_fd = (int)num[O_STDIN];
		if (stdin_fd >= 0 && stdin_fd == out_s.fd) /* the pty master for both: closed apart */
			stdin_fd = fcntl(stdin_fd, F_DUPFD_CLOEXEC, 3);
		ready_ok(); /* the container already runs */
	}
	log_fd = open_log("--log", log);
	if (log_fd < 0)
		setup_fail("cannot open the container log %s: %s", log, strerror(errno));
	{
		struct stat st;

		log_size = fstat(log_fd, &st) == 0 ? (int64_t)st.st_size : 0;
	}
	if (vm)
		load_run_frame(run_frame);
	if (attach && (vm ? stdin_open : stdin_fd >= 0))
		attach_listen(attach);
	reap(); /* a SIGCHLD from before the exec is queued too; this is for certain */
	agent_flush();
	loop();
	return 0;
}

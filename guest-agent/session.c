/* The agent's main loop (agent.h): one session per port, the container's
 * (the agent port) and one exec process per exec port.  Frames from each
 * host, the processes' output and stdin, EXEC starts, reaping, EXIT; after
 * EXIT the wait for SHUTDOWN. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <termios.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>

#define DRAIN_MS 2000        /* output drain after the container exits */
#define TICK_MS 50           /* how often an unconnected exec port is looked at */
#define KEEPALIVE_MS 1000    /* unprompted PONG while the agent port is not read (stdin full) */
#define MAX_DETACHED 64

struct session sess[1 + NEXEC];
int sfd = -1;
static int walking; /* WALK_AFTER: the walk runs (MAIN's process is the walk's) */
int self_pidns = -1;
static struct vmrt_run xrun; /* an EXEC being started */
static pid_t detached[MAX_DETACHED];

static void q_push(struct session *x, const uint8_t *p, size_t n)
{
	if (n > STDIN_QCAP - x->q_len) /* cannot happen: the port is only read with room */
		n = STDIN_QCAP - x->q_len;
	if (x->q_off + x->q_len + n > STDIN_QCAP) {
		memmove(x->stdin_q, x->stdin_q + x->q_off, x->q_len);
		x->q_off = 0;
	}
	memcpy(x->stdin_q + x->q_off + x->q_len, p, n);
	x->q_len += n;
	if (n)
		x->last_in = p[n - 1];
}

static void stdin_closed(struct session *x)
{
	if (x->s.in >= 0 && x->s.in != x->s.master)
		close(x->s.in);
	x->s.in = -1;
	x->q_len = x->q_off = 0;
}

/* The exec port's session is over: ready for the next EXEC. */
static void sess_reset(struct session *x)
{
	stdio_close(&x->s);
	x->pid = -1;
	x->exited = x->status = x->close_pending = 0;
	x->replaced = x->host_lost = 0;
	x->q_len = x->q_off = 0;
	x->last_in = '\n';
	x->state = S_IDLE; /* rbuf is kept: it may hold the next EXEC */
}

/* A bad frame on an exec port: ERROR 125 and the end of the session (its
 * process killed, no EXIT).  What follows is scanned for the next EXEC. */
static void sess_protocol_error(struct session *x, const char *what)
{
	char msg[512];

	snprintf(msg, sizeof msg, "agent: protocol error: %s", what);
	sess_error(x, 125, msg);
	if (x->state == S_ACTIVE) {
		if (!x->exited)
			kill_proc(x->pid);
		x->host_lost = 1;
		stdin_closed(x);
		x->close_pending = 0;
	} else {
		x->state = S_CLOSING;
	}
}

/* Drop bytes up to the next frame magic after the first byte: what a host
 * that went away left half-sent is not the start of the next host's stream. */
static void resync(struct session *x)
{
	static const uint8_t magic[2] = { VMRT_MAGIC >> 8, VMRT_MAGIC & 0xFF };
	const uint8_t *m = x->rlen > 1 ? memmem(x->rbuf + 1, x->rlen - 1, magic, 2) : NULL;
	size_t skip = m ? (size_t)(m - x->rbuf) : x->rlen;

	if (x->rlen > 0 && x->rbuf[x->rlen - 1] == magic[0] && !m)
		skip = x->rlen - 1; /* a magic cut in half */
	memmove(x->rbuf, x->rbuf + skip, x->rlen - skip);
	x->rlen -= skip;
}

/* EXEC (decoded into xrun) on an idle exec port: start the process in the
 * container's PID and mount namespaces and cgroup.  Ends in S_ACTIVE with
 * STARTED queued, or in S_CLOSING with ERROR queued (or with STARTED for a
 * detached process). */
static void exec_start(struct session *x)
{
	char msg[1024], pts[64], path[64];
	int ep[2], pidns = -1, mntns = -1, e;
	uint32_t code = 125;
	pid_t pid;

	x->exited = x->status = x->close_pending = 0;
	x->q_len = x->q_off = 0;
	x->last_in = '\n';
	x->state = S_CLOSING;
	if (child <= 0 || MAIN->exited) {
		sess_error(x, 125, "the container is not running");
		return;
	}
	snprintf(path, sizeof path, "/proc/%d/ns/pid", (int)child);
	pidns = open(path, O_RDONLY | O_CLOEXEC);
	snprintf(path, sizeof path, "/proc/%d/ns/mnt", (int)child);
	mntns = open(path, O_RDONLY | O_CLOEXEC);
	if (pidns < 0 || mntns < 0) {
		snprintf(msg, sizeof msg, "cannot open the container's namespaces: %s", strerror(errno));
		goto fail_ns;
	}
	if (stdio_open(&x->s, &xrun, xrun.detach, pts, sizeof pts, msg, sizeof msg) < 0)
		goto fail_ns;
	if (pipe2(ep, O_CLOEXEC) < 0) {
		snprintf(msg, sizeof msg, "pipe: %s", strerror(errno));
		goto fail_stdio;
	}
	/* children from now on are born in the container's PID namespace */
	if (setns(pidns, CLONE_NEWPID) < 0) {
		snprintf(msg, sizeof msg, "cannot enter the container's PID namespace: %s", strerror(errno));
		close(ep[0]);
		close(ep[1]);
		goto fail_stdio;
	}
	errpipe_w = ep[1];
	pid = fork();
	e = errno;
	if (pid == 0)
		exec_child_main(&x->s, &xrun, mntns);
	if (setns(self_pidns, CLONE_NEWPID) < 0)
		con("cannot return to the agent's PID namespace: %s", strerror(errno));
	errpipe_w = -1;
	close(ep[1]);
	close(pidns);
	close(mntns);
	stdio_close_child(&x->s);
	if (pid < 0) {
		close(ep[0]);
		snprintf(msg, sizeof msg, "cannot start the exec process: %s", strerror(e));
		stdio_close(&x->s);
		sess_error(x, 125, msg);
		return;
	}
	if (read_errpipe(ep[0], &code, msg, sizeof msg)) {
		waitpid(pid, NULL, 0);
		stdio_close(&x->s);
		sess_error(x, code, msg);
		return;
	}
	{
		uint8_t p[4];
		vmrt_put32(p, (uint32_t)pid);
		sess_send(x, VMRT_STARTED, p, 4);
	}
	if (xrun.detach) { /* on its own: reaped, and killed with the container */
		stdio_close(&x->s);
		for (int i = 0; i < MAX_DETACHED; i++)
			if (detached[i] <= 0) {
				detached[i] = pid;
				break;
			}
		return;
	}
	x->pid = pid;
	x->oom0 = oom_kills();
	x->state = S_ACTIVE;
	return;

fail_stdio:
	stdio_close_child(&x->s);
	stdio_close(&x->s);
fail_ns:
	if (pidns >= 0)
		close(pidns);
	if (mntns >= 0)
		close(mntns);
	sess_error(x, 125, msg);
}

/* Frames the session's host sent, as far as they can be acted on now. */
static void handle_frames(struct session *x)
{
	struct vmrt_frame f;
	char err[256];

	while (x->q_len <= STDIN_QCAP - VMRT_FRAME_MAX) {
		if (x->replaced)
			return;
		long n = vmrt_frame_parse(x->rbuf, x->rlen, VMRT_TO_AGENT, &f, err, sizeof err);
		if (n < 0) {
			if (x->is_main)
				protocol_error(err);
			if (x->state == S_ACTIVE && !x->host_lost) {
				sess_protocol_error(x, err);
				return;
			}
			resync(x); /* between sessions, or left by a host that is gone */
			continue;
		}
		if (n == 0)
			return;
		if (f.type == VMRT_EXEC && !x->is_main) {
			if (x->state == S_CLOSING)
				return; /* after the last session's frames are out */
			if (x->state == S_ACTIVE) {
				/* the host side closed and reopened unseen: this
				 * EXEC is a new host's; end the old process first */
				con("exec port %d: new EXEC while %d runs; killing it", x->idx, (int)x->pid);
				x->replaced = 1;
				if (!x->exited)
					kill_proc(x->pid);
				stdin_closed(x);
				x->close_pending = 0;
				return;
			}
		}
		memcpy(pbuf, f.payload, f.len);
		f.payload = pbuf;
		memmove(x->rbuf, x->rbuf + n, x->rlen - (size_t)n);
		x->rlen -= (size_t)n;

		if (!x->is_main && x->state != S_ACTIVE) {
			switch (f.type) {
			case VMRT_EXEC:
				if (vmrt_run_parse(f.payload, f.len, &xrun, err, sizeof err) < 0)
					sess_protocol_error(x, err);
				else
					exec_start(x);
				break;
			case VMRT_RUN:
			case VMRT_SHUTDOWN:
				sess_protocol_error(x, f.type == VMRT_RUN ? "RUN on an exec port"
									  : "SHUTDOWN on an exec port");
				break;
			default:
				break; /* left over from an ended session (a PING too) */
			}
			continue;
		}
		if (x->host_lost)
			continue; /* frames of a host that is gone */

		switch (f.type) {
		case VMRT_PING:
			/* liveness: queued like output, written as the port takes it */
			sess_send(x, VMRT_PONG, f.payload, f.len);
			sess_flush(x);
			break;
		case VMRT_STDIN:
			if (x->s.in >= 0 && !x->close_pending && !x->exited)
				q_push(x, f.payload, f.len);
			break;
		case VMRT_STDIN_CLOSE:
			if (x->s.in >= 0 && !x->close_pending) {
				x->close_pending = 1;
				if (x->s.master >= 0) {
					/* a terminal has no "close": send its EOF
					 * character if it is in canonical mode */
					struct termios t;
					if (tcgetattr(x->s.master, &t) == 0 && (t.c_lflag & ICANON)) {
						/* the first one only ends a partial line */
						if (x->last_in != '\n')
							q_push(x, &t.c_cc[VEOF], 1);
						q_push(x, &t.c_cc[VEOF], 1);
					}
				}
			}
			break;
		case VMRT_SIGNAL: {
			uint32_t sig = vmrt_get32(f.payload);
			if (!x->exited && x->pid > 0 && sig > 0 && sig < 65 && kill(x->pid, (int)sig) < 0)
				con("kill %d %u: %s", (int)x->pid, sig, strerror(errno));
			break;
		}
		case VMRT_RESIZE:
			if (x->s.master >= 0) {
				struct winsize ws = { .ws_row = vmrt_get16(f.payload),
						      .ws_col = vmrt_get16(f.payload + 2) };
				ioctl(x->s.master, TIOCSWINSZ, &ws);
			}
			break;
		case VMRT_SHUTDOWN:
			if (!x->is_main) {
				sess_protocol_error(x, "SHUTDOWN on an exec port");
				return;
			}
			con("shutdown requested");
			poweroff();
		case VMRT_RUN:
			if (x->is_main)
				protocol_error("second RUN");
			sess_protocol_error(x, "RUN on an exec port");
			return;
		case VMRT_EXEC: /* exec ports are handled above */
			protocol_error("EXEC on the agent port");
		}
	}
}

/* The host side of an exec port closed (or never opened).  What it still
 * had to read is dropped; what it sent stays (it may be a new host's EXEC
 * already: virtio-serial reports data and connection changes on separate
 * queues), to be scanned for the next EXEC. */
static void sess_hup(struct session *x)
{
	x->hup = 1;
	x->woff = x->wlen = 0;
	switch (x->state) {
	case S_ACTIVE:
		if (!x->exited) {
			con("exec port %d: host gone; killing %d", x->idx, (int)x->pid);
			kill_proc(x->pid);
		}
		x->host_lost = 1;
		stdin_closed(x);
		x->close_pending = 0;
		break;
	case S_CLOSING:
		x->state = S_IDLE;
		break;
	}
}

static void reap(void)
{
	struct signalfd_siginfo si;
	int st;
	pid_t pid;

	while (read(sfd, &si, sizeof si) > 0)
		;
	while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
		for (int i = 0; i < MAX_DETACHED; i++)
			if (detached[i] == pid)
				detached[i] = 0;
		for (int k = 0; k <= NEXEC; k++) {
			struct session *x = &sess[k];
			if (x->pid != pid || x->exited)
				continue;
			x->exited = 1;
			x->status = st;
			x->drain_deadline = now_ms() + DRAIN_MS;
			stdin_closed(x);
			x->close_pending = 0;
			if (!x->is_main)
				continue;
			/* as with Docker, exec processes end with the container */
			for (int j = 1; j <= NEXEC; j++)
				if (sess[j].pid > 0 && !sess[j].exited)
					kill_proc(sess[j].pid);
			for (int i = 0; i < MAX_DETACHED; i++)
				if (detached[i] > 0)
					kill_proc(detached[i]);
		}
	}
}

static void queue_exit(struct session *x)
{
	uint8_t p[12];
	uint32_t code, sig = 0;

	if (WIFSIGNALED(x->status)) {
		sig = (uint32_t)WTERMSIG(x->status);
		code = 128 + sig;
	} else {
		code = (uint32_t)WEXITSTATUS(x->status);
	}
	vmrt_put32(p, code);
	vmrt_put32(p + 4, sig);
	vmrt_put32(p + 8, oom_kills() > x->oom0 ? 1u : 0u);
	sess_send(x, VMRT_EXIT, p, sizeof p);
}

/* The process is gone and its output relayed (or the drain timed out), with
 * room in the queue for EXIT. */
static int drained(const struct session *x)
{
	return x->pid > 0 && x->exited &&
	       ((x->s.out < 0 && x->s.err < 0) || now_ms() >= x->drain_deadline) &&
	       x->wlen - x->woff < OUT_CHUNK;
}

/* An exec process is over: EXIT to its host, or nothing if that host is gone. */
static void exec_finish(struct session *x)
{
	if (!x->replaced && !x->host_lost) {
		queue_exit(x);
		stdio_close(&x->s);
		x->pid = -1;
		x->exited = 0;
		x->state = S_CLOSING;
		return;
	}
	sess_reset(x);
}

/* Relay one session's output and stdin after poll. */
static int relay(struct session *x, const struct pollfd *pout, const struct pollfd *perr,
		 const struct pollfd *pin)
{
	static uint8_t obuf[OUT_CHUNK];
	int master_hup = 0;

	for (int k = 0; k < 2; k++) {
		const struct pollfd *p = k == 0 ? pout : perr;
		int *fdp = k == 0 ? &x->s.out : &x->s.err;
		if (!p || *fdp < 0 || p->fd != *fdp || !p->revents)
			continue;
		for (int rounds = 0; rounds < 4 && x->wlen - x->woff < OUT_CHUNK; rounds++) {
			ssize_t n = read(*fdp, obuf, sizeof obuf);
			if (n > 0) {
				if (!x->host_lost && !x->replaced)
					sess_send(x, k == 0 ? VMRT_STDOUT : VMRT_STDERR, obuf, (size_t)n);
				sess_flush(x);
				continue;
			}
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0 && errno == EAGAIN)
				break;
			/* EOF, or EIO from a pty master whose slave is gone */
			if (*fdp == x->s.master) {
				if (!x->exited) {
					/* keep the master for stdin until exit */
					master_hup = 1;
					break;
				}
				x->s.master = -1;
				if (x->s.in == *fdp)
					x->s.in = -1;
			}
			close(*fdp);
			*fdp = -1;
			break;
		}
	}
	if (pin && x->q_len > 0 && x->s.in >= 0 && pin->fd == x->s.in && pin->revents) {
		ssize_t n = write(x->s.in, x->stdin_q + x->q_off, x->q_len);
		if (n > 0) {
			x->q_off += (size_t)n;
			x->q_len -= (size_t)n;
			if (x->q_len == 0)
				x->q_off = 0;
		} else if (n < 0 && errno != EAGAIN && errno != EINTR) {
			/* EPIPE: the process closed its stdin */
			stdin_closed(x);
			x->close_pending = 0;
		}
	}
	return master_hup;
}

/* Relay the container process and the exec processes until the container
 * has exited, then send its EXIT. */
void supervise(void)
{
	enum { PER = 4 };
	struct pollfd pfd[1 + PER * (1 + NEXEC)];
	int ip[1 + NEXEC], io[1 + NEXEC], ie[1 + NEXEC], ii[1 + NEXEC];
	int64_t last_tick = 0, last_keepalive = 0;

	for (;;) {
		int n = 0, timeout = -1, tick = 0, master_hup = 0;
		int64_t now = now_ms();

		for (int k = 0; k <= NEXEC; k++) {
			struct session *x = &sess[k];
			if (x->fd < 0)
				continue;
			if (!x->is_main) {
				if (drained(x))
					exec_finish(x);
				if (x->state == S_CLOSING && x->wlen == 0)
					x->state = S_IDLE;
				if (x->hup)
					continue;
			}
			handle_frames(x);
			if (x->close_pending && x->q_len == 0) {
				stdin_closed(x);
				x->close_pending = 0;
			}
		}

		if (drained(MAIN)) {
			int busy = 0;
			for (int k = 1; k <= NEXEC; k++)
				if (sess[k].fd >= 0 && (sess[k].pid > 0 || (sess[k].state == S_CLOSING && sess[k].wlen)))
					busy = 1;
			if (!busy || now >= MAIN->drain_deadline) {
				int ok = WIFEXITED(MAIN->status) && WEXITSTATUS(MAIN->status) == 0;

				sync_upper();
				queue_exit(MAIN);
				if (run.walk_after && ok && !walking) {
					/* the step's layer: its walk's stream and EXIT follow */
					pid_t pid;

					walking = 1;
					child = -1; /* no EXEC from now on: the container is gone */
					stdio_close(&MAIN->s);
					pid = walk_spawn(&MAIN->s);
					if (pid > 0) {
						MAIN->pid = pid;
						MAIN->exited = MAIN->status = 0;
						continue;
					}
					MAIN->status = 125 << 8;
					queue_exit(MAIN);
				}
				main_flush();
				return;
			}
		}

		pfd[n].fd = sfd;
		pfd[n++].events = POLLIN;
		for (int k = 0; k <= NEXEC; k++) {
			struct session *x = &sess[k];
			ip[k] = io[k] = ie[k] = ii[k] = -1;
			if (x->fd < 0)
				continue;
			if (!x->is_main && x->hup) {
				tick = 1;
			} else {
				pfd[n].fd = x->fd;
				pfd[n].events = (short)((x->q_len <= STDIN_QCAP - VMRT_FRAME_MAX &&
							 x->rlen < sizeof x->rbuf ? POLLIN : 0) |
							(x->wlen > x->woff ? POLLOUT : 0));
				ip[k] = n++;
			}
			if (x->pid > 0 && x->wlen - x->woff < OUT_CHUNK) {
				if (x->s.out >= 0) {
					pfd[n].fd = x->s.out;
					pfd[n].events = POLLIN;
					io[k] = n++;
				}
				if (x->s.err >= 0) {
					pfd[n].fd = x->s.err;
					pfd[n].events = POLLIN;
					ie[k] = n++;
				}
			}
			if (x->q_len > 0 && x->s.in >= 0) {
				pfd[n].fd = x->s.in;
				pfd[n].events = POLLOUT;
				ii[k] = n++;
			}
			if (x->pid > 0 && x->exited) {
				int64_t left = x->drain_deadline - now;
				int t = left < 0 ? 0 : (int)left;
				if (timeout < 0 || t < timeout)
					timeout = t;
			}
		}
		/* While the process leaves its stdin queue full the agent port is
		 * not read, so the host's PINGs wait behind its STDIN: tell the
		 * host we are alive with an unprompted PONG (cookie 0) instead. */
		if (MAIN->q_len > STDIN_QCAP - VMRT_FRAME_MAX) {
			if (now - last_keepalive >= KEEPALIVE_MS) {
				static const uint8_t zero[8];
				sess_send(MAIN, VMRT_PONG, zero, sizeof zero);
				sess_flush(MAIN);
				last_keepalive = now;
			}
			int t = (int)(last_keepalive + KEEPALIVE_MS - now);
			if (timeout < 0 || t < timeout)
				timeout = t;
		}
		if (tick && (timeout < 0 || timeout > TICK_MS))
			timeout = TICK_MS;
		if (poll(pfd, (nfds_t)n, timeout) < 0) {
			if (errno == EINTR)
				continue;
			con("poll: %s", strerror(errno));
			poweroff();
		}

		if (pfd[0].revents)
			reap();

		for (int k = 0; k <= NEXEC; k++) {
			struct session *x = &sess[k];
			if (x->fd < 0)
				continue;
			master_hup |= relay(x, io[k] >= 0 ? &pfd[io[k]] : NULL, ie[k] >= 0 ? &pfd[ie[k]] : NULL,
					    ii[k] >= 0 ? &pfd[ii[k]] : NULL);
			if (ip[k] < 0)
				continue;
			short re = pfd[ip[k]].revents;
			int gone = 0;
			if (re & POLLOUT)
				sess_flush(x);
			if ((re & POLLIN) && (pfd[ip[k]].events & POLLIN)) {
				gone = port_read(x) == 0;
			} else if (re & (POLLHUP | POLLERR | POLLNVAL)) {
				gone = 1;
			}
			if (gone) {
				if (x->is_main)
					host_gone();
				sess_hup(x);
			}
		}

		/* an exec port without its host: look again now and then */
		if (tick && now_ms() - last_tick >= TICK_MS) {
			last_tick = now_ms();
			for (int k = 1; k <= NEXEC; k++) {
				struct session *x = &sess[k];
				struct pollfd p = { .fd = x->fd, .events = POLLIN };
				if (x->fd >= 0 && x->hup && poll(&p, 1, 0) >= 0 && !(p.revents & POLLHUP))
					x->hup = 0;
			}
		}
		/* With no slave open (the process closed its terminal) a pty
		 * master polls as hung up until the process exits: do not spin. */
		if (master_hup)
			usleep(10000);
	}
}

/* After EXIT or ERROR: wait for SHUTDOWN or EOF, at most ms, then power off. */
void linger(int ms)
{
	int64_t deadline = now_ms() + ms;
	struct vmrt_frame f;
	char err[256];

	for (;;) {
		for (;;) {
			long n = vmrt_frame_parse(MAIN->rbuf, MAIN->rlen, VMRT_TO_AGENT, &f, err, sizeof err);
			if (n < 0)
				poweroff();
			if (n == 0)
				break;
			if (f.type == VMRT_SHUTDOWN)
				poweroff();
			memmove(MAIN->rbuf, MAIN->rbuf + n, MAIN->rlen - (size_t)n);
			MAIN->rlen -= (size_t)n;
		}
		int64_t left = deadline - now_ms();
		if (left <= 0)
			poweroff();
		struct pollfd pfd = { .fd = port_fd, .events = POLLIN };
		if (poll(&pfd, 1, (int)left) > 0) {
			if (!(pfd.revents & POLLIN) || port_read(MAIN) == 0)
				poweroff();
		}
	}
}

void sessions_init(void)
{
	for (int k = 0; k <= NEXEC; k++) {
		struct session *x = &sess[k];
		x->fd = -1;
		x->is_main = k == 0;
		x->idx = k - 1;
		x->state = S_IDLE;
		x->pid = -1;
		x->last_in = '\n';
		x->s.child_in = x->s.child_out = x->s.child_err = -1;
		x->s.in = x->s.out = x->s.err = x->s.master = -1;
	}
}

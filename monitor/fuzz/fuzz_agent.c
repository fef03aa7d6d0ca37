/* libFuzzer target: the monitor of a VM container, driven the way its poll
 * loop would be by a hostile guest (the agent channel and the console), an
 * attach client, signals, the clock and QEMU/virtiofsd ending.
 *
 * The input is a script.  Byte 0 sets the run up (stdin open, liveness
 * pings, a start timeout, a virtiofsd, stdin closed at a client's EOF, output
 * logged as it comes).  Then ops of [op][u16 length][bytes]:
 *   0, 1  bytes from the agent (read by agent_read(), any chunking)
 *   2     bytes from an attach client (client_read())
 *   3     bytes on the guest console (console_read())
 *   4     a signal to the monitor (on_signal())
 *   5     the clock moves on (timers())
 *   6     QEMU or virtiofsd ends (on_reaped())
 *   7     the agent channel, attach client or console closes
 * At the end QEMU exits and the clock runs on until the monitor finishes.
 *
 * Checked: nothing crashes, hangs or leaks; no signal ever goes to a PID <= 0;
 * everything the monitor sends the agent is a valid host->agent frame stream
 * (the RUN frame first, only forwarded signals); the json-file log holds only
 * strict records; the console log stays within its cap; the finish command
 * gets a known HOW, a number as VALUE and valid UTF-8 as DETAIL. */
#include "harness.h"

#include <sys/ioctl.h>
#include <sys/mman.h>

static int mlog = -1, mconsole = -1;     /* memfds: the container log, the console log */
static int ag_peer = -1, cl_peer = -1, con_peer = -1; /* the guest's / client's ends */
static uint8_t tobuf[2 * VMRT_FRAME_MAX]; /* what the agent received, not yet parsed */
static size_t tolen, toframes;
static int fz_stdin_ok; /* STDIN frames may come: stdin open at the start, no STDIN_CLOSE yet */
static uint8_t dec[LOG_PIECE * 3 + 16];
static char *fz_argv[] = { "/nonexistent/finish", "--finish", "fz", NULL };

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	ignore_sigpipe();
	mlog = memfd_create("container.log", MFD_CLOEXEC);
	mconsole = memfd_create("console.log", MFD_CLOEXEC);
	check(mlog >= 0 && mconsole >= 0);
	return 0;
}

static void pair(int *ours, int *theirs)
{
	int sv[2];

	check(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) == 0);
	*ours = sv[0];
	*theirs = sv[1];
}

static int readable(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };

	return fd >= 0 && poll(&p, 1, 0) > 0;
}

/* The agent's side reads what the monitor sent: a valid host->agent stream. */
static void agent_receives(void)
{
	for (;;) {
		ssize_t n = ag_peer < 0 ? -1 : read(ag_peer, tobuf + tolen, sizeof tobuf - tolen);
		size_t off = 0;

		if (n <= 0)
			return;
		tolen += (size_t)n;
		for (;;) {
			struct vmrt_frame f;
			char err[128];
			long k = vmrt_frame_parse(tobuf + off, tolen - off, VMRT_TO_AGENT, &f, err, sizeof err);

			check(k >= 0);
			if (k == 0)
				break;
			check(toframes > 0 || f.type == VMRT_RUN);
			check(f.type != VMRT_RUN || toframes == 0);
			if (f.type == VMRT_SIGNAL) {
				uint32_t s = vmrt_get32(f.payload);

				check(s == SIGTERM || s == SIGINT || s == SIGHUP || s == SIGQUIT ||
				      s == SIGUSR1 || s == SIGUSR2);
			}
			/* STDIN only with stdin open, and none after STDIN_CLOSE (in the stream's order:
			 * the monitor may have closed it since the frame was queued) */
			if (f.type == VMRT_STDIN_CLOSE)
				fz_stdin_ok = 0;
			check(f.type != VMRT_STDIN || fz_stdin_ok);
			toframes++;
			off += (size_t)k;
		}
		memmove(tobuf, tobuf + off, tolen - off);
		tolen -= off;
	}
}

static void pump_agent(void)
{
	while (agent_fd >= 0 && readable(agent_fd)) {
		agent_read();
		agent_receives();
	}
	agent_receives();
}

static void pump_client(void)
{
	while (clients[0] >= 0 && readable(clients[0]) && stdin_room()) {
		client_read(0);
		agent_receives();
	}
}

static void pump_console(void)
{
	while (console_fd >= 0 && readable(console_fd))
		console_read();
}

/* Bytes into a peer socket, the monitor reading as they go. */
static void send_to(int *peer, const uint8_t *d, size_t n, void (*pump)(void))
{
	size_t off = 0;
	int stuck = 0;

	while (off < n && *peer >= 0 && stuck < 2) {
		ssize_t w = write(*peer, d + off, n - off);

		if (w > 0)
			off += (size_t)w;
		stuck = w > 0 ? 0 : stuck + 1; /* the monitor stopped reading: the rest is lost */
		pump();
	}
}

static void hang_up(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

static void reset(uint8_t conf)
{
	uint8_t *p;

	check(ftruncate(mlog, 0) == 0 && lseek(mlog, 0, SEEK_SET) == 0);
	check(ftruncate(mconsole, 0) == 0 && lseek(mconsole, 0, SEEK_SET) == 0);
	vm = 1;
	cid = "fz";
	finish_argv = fz_argv;
	finish_argc = 3;
	adopted = 0;
	stdin_open = conf & 1;
	fz_stdin_ok = stdin_open;
	stdin_once = (conf & 16) != 0; /* a client's EOF: STDIN_CLOSE, then no STDIN */
	partial = (conf & 32) != 0;    /* each output frame logged as it comes */
	tty_mode = 0;
	resize_path = finisher = NULL;  /* neither opens nor connects anything here */
	health_ms = 0;                  /* no probe is forked */
	health_next = -1;
	health_pid = -1;
	now = 1000000;
	dead_ms = (conf & 2) ? 20000 : 0;
	ping_ms = 5000;
	start_s = (conf & 4) ? 60 : 0;
	start_deadline = now + 60000;
	last_rx = last_ping = now;
	started = 0;
	cookie = 0;
	terms = killed = 0;
	memset(&end, 0, sizeof end);
	end.how = "";
	qemu_pid = 4242;
	qemu_alive = 1;
	vfs_pid = (conf & 8) ? 4243 : -1;
	vfs_alive = vfs_pid > 0;
	qemu_pidfd = vfs_pidfd = -1;
	sfd = ready_fd = listen_fd = -1;
	log_fd = mlog;
	log_failed = 0;
	log_path = NULL;
	log_max_size = log_size = 0;
	console_log = mconsole;
	console_written = 0;
	out_s = (struct stream){ .fd = -1, .name = "stdout" };
	err_s = (struct stream){ .fd = -1, .name = "stderr" };
	rlen = woff = wlen = 0;
	tolen = toframes = 0;
	pair(&agent_fd, &ag_peer);
	pair(&console_fd, &con_peer);
	for (int i = 0; i < MAX_CLIENTS; i++)
		clients[i] = -1;
	pair(&clients[0], &cl_peer);
	fz_finished = 0;
	fz_exit_code = -1;
	/* the RUN frame, as load_run_frame() leaves it */
	p = wq + VMRT_HDR_LEN;
	*p++ = VMRT_TAG_ARG;
	vmrt_put32(p, 2);
	memcpy(p + 4, "sh", 2);
	vmrt_frame_header(wq, VMRT_RUN, 7);
	wlen = VMRT_HDR_LEN + 7;
	agent_flush();
	agent_receives();
}

static void op(uint8_t o, const uint8_t *d, size_t n)
{
	static const int sigs[] = { SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGCHLD, 0 };
	uint8_t a = n > 0 ? d[0] : 0, b = n > 1 ? d[1] : 0;

	switch (o & 7) {
	case 0:
	case 1:
		send_to(&ag_peer, d, n, pump_agent);
		break;
	case 2:
		send_to(&cl_peer, d, n, pump_client);
		break;
	case 3:
		send_to(&con_peer, d, n, pump_console);
		break;
	case 4:
		on_signal(sigs[a % 8] ? sigs[a % 8] : FORCE_KILL);
		break;
	case 5:
		now += (int64_t)(a | b << 8) * 7;
		(void)timers();
		break;
	case 6:
		on_reaped(a & 1 ? qemu_pid : vfs_pid, a & 2 ? (b & 0x7f) : b << 8);
		break;
	case 7:
		if (a % 3 == 0) {
			shutdown(ag_peer, SHUT_WR);
			pump_agent();
		} else if (a % 3 == 1) {
			hang_up(&cl_peer);
			pump_client();
		} else {
			hang_up(&con_peer);
			pump_console();
		}
		break;
	}
	agent_receives();
}

static int utf8_ok(const char *s)
{
	const uint8_t *u = (const uint8_t *)s;
	size_t n = strlen(s);

	for (size_t i = 0; i < n;) {
		size_t k = u[i] < 0x80 ? 1 : vmrt_utf8_seq(u + i, n - i);

		if (!k)
			return 0;
		i += k;
	}
	return 1;
}

static void verify(void)
{
	static const char *const hows[] = { "exit", "error", "killed", "hung", "timeout",
					    "interrupted", "qemu", "virtiofsd", "agent" };
	size_t n = 0, len;
	int known = 0, is_err;
	char *e;
	const char *q, *end_;
	char *buf;
	long v;
	struct stat st;

	check(fz_exit_code == -1 && fz_finished);
	for (size_t i = 0; i < sizeof hows / sizeof *hows; i++)
		known |= !strcmp(fz_how, hows[i]);
	check(known);
	v = strtol(fz_value, &e, 10);
	check(*fz_value && !*e);
	if (!strcmp(fz_how, "exit"))
		check(v >= 0 && v <= 255);
	check(utf8_ok(fz_detail)); /* the guest's ERROR text goes on as valid UTF-8 */
	check(fstat(mconsole, &st) == 0 && st.st_size <= CONSOLE_MAX);
	check(fstat(mlog, &st) == 0);
	buf = malloc((size_t)st.st_size + 1);
	check(buf != NULL);
	check(pread(mlog, buf, (size_t)st.st_size, 0) == st.st_size);
	for (q = buf, end_ = buf + st.st_size; q < end_; n++)
		q = parse_record(q, end_, dec, &len, &is_err);
	free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	volatile size_t off = 1;

	if (size == 0)
		return 0;
	reset(data[0]);
	fz_armed = 1;
	if (setjmp(fz_done) == 0) {
		while (off + 3 <= size) {
			size_t n = (size_t)data[off + 1] | (size_t)data[off + 2] << 8;
			size_t at = off;

			if (n > size - at - 3)
				n = size - at - 3;
			off = at + 3 + n;
			op(data[at], data + at + 3, n);
		}
		/* the end of the script: QEMU exits, and the clock runs until the monitor
		 * has run its finish command */
		for (int i = 0; i < 4; i++) {
			if (qemu_alive)
				on_reaped(qemu_pid, 0);
			now += 10000;
			(void)timers();
		}
		check(0); /* a monitor that never finishes */
	}
	fz_armed = 0;
	verify();
	/* the fds finish() would have closed with close_range() */
	hang_up(&agent_fd);
	hang_up(&console_fd);
	for (int i = 0; i < MAX_CLIENTS; i++)
		hang_up(&clients[i]);
	hang_up(&ag_peer);
	hang_up(&cl_peer);
	hang_up(&con_peer);
	return 0;
}

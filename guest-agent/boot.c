/* vmrt-agent's start (agent.h): PID 1's boot (console, /proc, /sys, /dev,
 * the virtio-serial ports), HELLO, the wait for RUN, then the container's
 * setup and start in order, and its end (poweroff). */
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <linux/random.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define AGENT_VERSION "vmrt-agent 0.3.0"
#define PORT_NAME "org.vmrt.agent.0"
#define EXEC_PORT_PREFIX "org.vmrt.exec."
#define LINGER_MS 10000      /* wait for SHUTDOWN/EOF after EXIT */
#define ERROR_LINGER_MS 1000 /* the same after ERROR */

static uint64_t start_ns;
int host_seen;
pid_t child = -1;
struct vmrt_run run;

/* ---------------------------------------------------------------- console */

void con(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	size_t n;

	va_start(ap, fmt);
	n = logline_format(buf, sizeof buf, "vmrt-agent: ", fmt, ap);
	va_end(ap);
	(void)!write(2, buf, n);
}

/* Kill a session's process and its process group (it is a session leader). */
void kill_proc(pid_t pid)
{
	if (pid > 0) {
		kill(-pid, SIGKILL);
		kill(pid, SIGKILL);
	}
}

void poweroff(void)
{
	if (child > 0)
		kill(child, SIGKILL);
	for (int k = 1; k <= NEXEC; k++)
		if (!sess[k].exited)
			kill_proc(sess[k].pid);
	sync();
	reboot(RB_AUTOBOOT);
	con("reboot failed: %s", strerror(errno));
	for (;;)
		pause();
}

/* ---------------------------------------------------------------- boot */

static void ensure_stdio(void)
{
	for (int fd = 0; fd < 3; fd++) {
		if (fcntl(fd, F_GETFD) >= 0)
			continue;
		int n = open("/dev/console", O_RDWR | O_NOCTTY);
		if (n < 0)
			n = open("/dev/null", O_RDWR);
		if (n >= 0 && n != fd) {
			dup2(n, fd);
			close(n);
		}
	}
}


static void boot_mount(const char *src, const char *dst, const char *type,
		       unsigned long flags, const char *data)
{
	mkdir(dst, 0755);
	if (mount(src, dst, type, flags, data) < 0 && errno != EBUSY)
		con("mount %s on %s: %s", type, dst, strerror(errno));
}

/* Open the virtio-serial port called want (non-blocking). */
static int find_port(const char *want, int wait_ms)
{
	char path[PATH_MAX], name[128];
	int64_t deadline = now_ms() + wait_ms;

	for (;;) {
		DIR *d = opendir("/sys/class/virtio-ports");
		struct dirent *e;

		while (d && (e = readdir(d))) {
			int fd;
			ssize_t n;

			if (e->d_name[0] == '.')
				continue;
			snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
			fd = open(path, O_RDONLY | O_CLOEXEC);
			if (fd < 0)
				continue;
			n = read(fd, name, sizeof name - 1);
			close(fd);
			if (n <= 0)
				continue;
			name[n] = '\0';
			name[strcspn(name, "\n")] = '\0';
			if (strcmp(name, want) != 0)
				continue;
			snprintf(path, sizeof path, "/dev/%s", e->d_name);
			fd = open(path, O_RDWR | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
			if (fd >= 0) {
				closedir(d);
				return fd;
			}
		}
		if (d)
			closedir(d);
		if (now_ms() > deadline)
			return -1;
		usleep(10000);
	}
}

static void send_hello(void)
{
	uint8_t p[20 + sizeof AGENT_VERSION];
	size_t vlen = strlen(AGENT_VERSION);

	vmrt_put16(p, VMRT_PROTO_VERSION);
	vmrt_put16(p + 2, 0);
	vmrt_put64(p + 4, start_ns);
	vmrt_put64(p + 12, clock_ns(CLOCK_BOOTTIME));
	memcpy(p + 20, AGENT_VERSION, vlen);
	send_frame(VMRT_HELLO, p, 20 + vlen);
}

/* Read frames until RUN and decode it into `run`. */
static void wait_run(void)
{
	struct vmrt_frame f;
	char err[256];
	int64_t eof_since = -1;

	for (;;) {
		while (next_frame(&f)) {
			switch (f.type) {
			case VMRT_RUN:
				if (vmrt_run_parse(f.payload, f.len, &run, err, sizeof err) < 0)
					protocol_error(err);
				return;
			case VMRT_SHUTDOWN:
				con("shutdown requested");
				poweroff();
			case VMRT_PING:
				send_frame(VMRT_PONG, f.payload, f.len);
				break;
			default:
				snprintf(err, sizeof err, "frame type 0x%02x before RUN", f.type);
				protocol_error(err);
			}
		}
		port_wait(POLLIN, -1);
		if (port_read(MAIN) == 0) {
			/* The host is not connected (yet): virtio-serial returns 0
			 * without data then.  Give it PORT_WAIT_MS. */
			if (eof_since < 0)
				eof_since = now_ms();
			if (now_ms() - eof_since > PORT_WAIT_MS) {
				con("no RUN from the host");
				poweroff();
			}
			usleep(10000);
		} else {
			eof_since = -1;
		}
	}
}

int main(void)
{
	static const char hello_line[] = "vmrt-agent: init\n";
	char msg[1024], pts[64];
	uint32_t code = 125;
	sigset_t mask;
	int ep[2];

	start_ns = clock_ns(CLOCK_BOOTTIME);
	(void)!write(1, hello_line, sizeof hello_line - 1);
	ensure_stdio();
	umask(022);
	sessions_init();

	boot_mount("proc", "/proc", "proc", MS_NOSUID | MS_NOEXEC | MS_NODEV, NULL);
	boot_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NOEXEC | MS_NODEV, NULL);
	boot_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	boot_mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "ptmxmode=0666,mode=0620");
	boot_mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
	mkdir("/tmp", 01777);
	ensure_stdio();
	/* as Debian's systemd sizes a 64-bit host (what a process container
	 * sees): PIDs up to 4194304, and threads bounded by memory and the
	 * container's pids limit rather than by the kernel's 1/8-of-RAM guess */
	if (write_file("/proc/sys/kernel/pid_max", "4194304") < 0 ||
	    write_file("/proc/sys/kernel/threads-max", "4194304") < 0)
		con("cannot raise pid_max/threads-max: %s", strerror(errno));
	self_pidns = open("/proc/self/ns/pid", O_RDONLY | O_CLOEXEC);

	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&mask);
	sigaddset(&mask, SIGCHLD);
	sigprocmask(SIG_BLOCK, &mask, NULL);
	sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (sfd < 0) {
		con("signalfd: %s", strerror(errno));
		poweroff();
	}

	port_fd = find_port(PORT_NAME, 5000);
	if (port_fd < 0) {
		con("virtio-serial port %s not found", PORT_NAME);
		poweroff();
	}
	/* open the exec ports now: the guest drops what a host sends to a
	 * port no one has open */
	for (int k = 1; k <= NEXEC; k++) {
		char name[64];
		snprintf(name, sizeof name, EXEC_PORT_PREFIX "%d", k - 1);
		sess[k].fd = find_port(name, 0);
		if (sess[k].fd < 0)
			con("virtio-serial port %s not found; no exec there", name);
	}
	send_hello();
	wait_run();
	host_seen = 1;

	/* A VM restored from a snapshot shares its RNG state with every other clone
	 * of that snapshot: mix in the host's bytes and reseed now, before anything
	 * (the boot id, the container) reads from it. */
	if (run.seed_len) {
		struct {
			int entropy_count;
			int buf_size;
			uint8_t buf[VMRT_SEED_MAX];
		} ent;
		int rfd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);

		ent.entropy_count = (int)run.seed_len * 8;
		ent.buf_size = (int)run.seed_len;
		memcpy(ent.buf, run.seed, run.seed_len);
		if (rfd < 0 || ioctl(rfd, RNDADDENTROPY, &ent) < 0 || ioctl(rfd, RNDRESEEDCRNG) < 0)
			con("reseeding the RNG: %s", strerror(errno));
		if (rfd >= 0)
			close(rfd);
	}
	if (run.has_time) {
		struct timespec ts = { .tv_sec = (time_t)(run.time_ns / 1000000000u),
				       .tv_nsec = (long)(run.time_ns % 1000000000u) };
		if (clock_settime(CLOCK_REALTIME, &ts) < 0)
			con("clock_settime: %s", strerror(errno));
	}
	if (sethostname(run.hostname, strlen(run.hostname)) < 0)
		fatal(125, "cannot set hostname \"%s\": %s", run.hostname, strerror(errno));
	setup_network();

	setup_rootfs();
	setup_container_mounts();
	setup_cgroup();
	if (stdio_open(&MAIN->s, &run, 0, pts, sizeof pts, msg, sizeof msg) < 0)
		fatal(125, "%s", msg);
	if (run.tty && mount(pts, ROOT "/dev/console", NULL, MS_BIND, NULL) < 0)
		con("bind %s on /dev/console: %s", pts, strerror(errno));

	if (pipe2(ep, O_CLOEXEC) < 0)
		fatal(125, "pipe: %s", strerror(errno));
	errpipe_w = ep[1];

	child = (pid_t)syscall(SYS_clone, CLONE_NEWPID | CLONE_NEWNS | SIGCHLD, 0, 0, 0, 0);
	if (child < 0) {
		con("clone: %s; falling back to fork", strerror(errno));
		child = fork();
	}
	if (child < 0)
		fatal(125, "cannot start the container process: %s", strerror(errno));
	if (child == 0)
		child_main(&MAIN->s);

	close(ep[1]);
	errpipe_w = -1;
	stdio_close_child(&MAIN->s);

	/* EOF on the error pipe: exec succeeded */
	if (read_errpipe(ep[0], &code, msg, sizeof msg)) {
		send_error(code, msg);
		waitpid(child, NULL, 0);
		child = -1;
		linger(ERROR_LINGER_MS);
	}

	{
		uint8_t p[4];
		vmrt_put32(p, (uint32_t)child);
		send_frame(VMRT_STARTED, p, 4);
	}
	MAIN->pid = child;
	MAIN->oom0 = oom_kills();
	MAIN->state = S_ACTIVE;
	supervise();
	child = -1;
	linger(LINGER_MS);
}

/* vmrt-agent: PID 1 of a vmrt micro-VM.
 *
 * Boots the guest userspace, talks the agent protocol (docs/agent-protocol.md)
 * with the host over the virtio-serial port "org.vmrt.agent.0", sets up the
 * container root (virtio-fs image + overlayfs on tmpfs), runs the container
 * process in new PID and mount namespaces, relays its stdio and reports its
 * exit, then powers the VM off.  While the container runs, the exec ports
 * "org.vmrt.exec.N" each carry one extra process at a time (EXEC), started in
 * the container's namespaces, root and cgroup. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/random.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <net/route.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <linux/capability.h>
#include <linux/openat2.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "proto.h"

#define AGENT_VERSION "vmrt-agent 0.3.0"
#define PORT_NAME "org.vmrt.agent.0"
#define EXEC_PORT_PREFIX "org.vmrt.exec."
#define NEXEC 4 /* exec ports org.vmrt.exec.0 .. 3 (the host's EXEC_PORTS) */
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#define SHARE "/run/vmrt/share" /* the virtio-fs share: rootfs/ and volumes/ */
#define LOWER SHARE "/rootfs"
#define RWDIR "/run/vmrt/rw"
#define ROOT "/run/vmrt/root"

#define OUT_CHUNK (16 * 1024)
#define STDIN_QCAP (4 * VMRT_FRAME_MAX)
#define WQ_CAP (2 * VMRT_FRAME_MAX) /* frames waiting for the port; output is read below OUT_CHUNK */
#define PORT_WAIT_MS 10000   /* how long the host may stay unconnected before RUN */
#define DRAIN_MS 2000        /* output drain after the container exits */
#define LINGER_MS 10000      /* wait for SHUTDOWN/EOF after EXIT */
#define ERROR_LINGER_MS 1000 /* the same after ERROR */
#define TICK_MS 50           /* how often an unconnected exec port is looked at */
#define KEEPALIVE_MS 1000    /* unprompted PONG while the agent port is not read (stdin full) */
#define MAX_DETACHED 64

struct stdio {
	int child_in, child_out, child_err; /* the child's ends */
	int in;     /* our end of stdin (pipe write end or pty master), -1 if none */
	int out;    /* pipe read end or pty master */
	int err;    /* pipe read end or -1 */
	int master; /* pty master or -1 */
};

/* One port and the process it carries: the container's (sess[0], the agent
 * port) or an exec process (sess[1..NEXEC], the exec ports). */
enum { S_IDLE, S_ACTIVE, S_CLOSING };

struct session {
	int fd;       /* the virtio-serial port, -1 if missing */
	int is_main;  /* the agent port: the container process */
	int idx;      /* exec port number */
	int state;    /* exec ports: S_* */
	int hup;      /* exec ports: the host side is not connected */
	int replaced; /* exec: an EXEC came while a process ran: the host changed */
	int host_lost; /* exec: the host went away while the process ran: no EXIT */
	pid_t pid;    /* the process; -1 if none */
	int exited, status, close_pending;
	int64_t drain_deadline;
	uint64_t oom0;
	struct stdio s;
	uint8_t last_in; /* last byte queued for a terminal */
	size_t rlen, woff, wlen, q_off, q_len;
	uint8_t rbuf[VMRT_FRAME_MAX];  /* frames from the host */
	uint8_t wq[WQ_CAP];            /* frames to the host */
	uint8_t stdin_q[STDIN_QCAP];   /* bytes for the process's stdin */
};

static uint64_t start_ns;
static int host_seen; /* RUN received: from now on HUP means the host is gone */
static pid_t child = -1;
static struct session sess[1 + NEXEC];
#define MAIN (&sess[0])
#define port_fd (sess[0].fd)

static struct vmrt_run run;  /* the container's RUN */
static struct vmrt_run xrun; /* an EXEC being started */
static uint8_t pbuf[VMRT_MAX_PAYLOAD];
static pid_t detached[MAX_DETACHED];

static void poweroff(void) __attribute__((noreturn));
static void fatal(int code, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));

/* ---------------------------------------------------------------- console */

static void con(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void con(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	int n = snprintf(buf, sizeof buf, "vmrt-agent: ");

	va_start(ap, fmt);
	vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
	va_end(ap);
	n = (int)strlen(buf);
	buf[n++] = '\n';
	(void)!write(2, buf, (size_t)n);
}

static uint64_t clock_ns(clockid_t c)
{
	struct timespec ts;

	clock_gettime(c, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int64_t now_ms(void)
{
	return (int64_t)(clock_ns(CLOCK_MONOTONIC) / 1000000u);
}

/* Kill a session's process and its process group (it is a session leader). */
static void kill_proc(pid_t pid)
{
	if (pid > 0) {
		kill(-pid, SIGKILL);
		kill(pid, SIGKILL);
	}
}

static void poweroff(void)
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

/* ---------------------------------------------------------------- port I/O */

static void host_gone(void) __attribute__((noreturn));
static void host_gone(void)
{
	con("host disconnected");
	poweroff();
}

/* Wait until the agent port is ready for events (POLLIN or POLLOUT).  Before
 * RUN a hang-up means the host side is not connected yet (virtio-serial
 * reports POLLHUP until QEMU says the chardev is open): wait up to
 * PORT_WAIT_MS for it.  After RUN it means the host is gone.  Returns the
 * revents. */
static short port_wait(short events, int timeout_ms)
{
	static int64_t hup_since = -1;
	struct pollfd pfd = { .fd = port_fd, .events = events };
	int n;

	for (;;) {
		n = poll(&pfd, 1, timeout_ms);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			con("poll(port): %s", strerror(errno));
			poweroff();
		}
		if (n == 0)
			return 0;
		if (pfd.revents & POLLNVAL)
			poweroff();
		if ((pfd.revents & events) || !(pfd.revents & (POLLHUP | POLLERR))) {
			hup_since = -1;
			return pfd.revents;
		}
		/* hang-up without the event we want */
		if (host_seen)
			host_gone();
		if (hup_since < 0)
			hup_since = now_ms();
		if (now_ms() - hup_since > PORT_WAIT_MS) {
			con("host never connected to the agent port");
			poweroff();
		}
		usleep(10000);
	}
}

static void port_write_all(const uint8_t *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(port_fd, p, n);
		if (w > 0) {
			p += w;
			n -= (size_t)w;
		} else if (w < 0 && errno == EINTR) {
			continue;
		} else if (w < 0 && errno == EAGAIN) {
			port_wait(POLLOUT, -1);
		} else {
			con("write(port): %s", w < 0 ? strerror(errno) : "short write");
			if (host_seen)
				host_gone();
			usleep(10000);
		}
	}
}

/* Write what a session's queue holds without blocking.  An exec port whose
 * host is gone loses it. */
static void sess_flush(struct session *x)
{
	while (x->woff < x->wlen) {
		ssize_t w = write(x->fd, x->wq + x->woff, x->wlen - x->woff);
		if (w > 0) {
			x->woff += (size_t)w;
			continue;
		}
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN)
			break;
		if (x->is_main) {
			con("write(port): %s", w < 0 ? strerror(errno) : "short write");
			if (host_seen)
				host_gone();
			break;
		}
		x->woff = x->wlen = 0;
	}
	if (x->woff == x->wlen)
		x->woff = x->wlen = 0;
}

/* The agent port's queue, written out whatever it takes. */
static void main_flush(void)
{
	port_write_all(MAIN->wq + MAIN->woff, MAIN->wlen - MAIN->woff);
	MAIN->woff = MAIN->wlen = 0;
}

/* Queue a frame for a session's host. */
static void sess_send(struct session *x, uint8_t type, const void *payload, size_t len)
{
	if (len > VMRT_MAX_PAYLOAD)
		len = VMRT_MAX_PAYLOAD;
	if (x->woff > 0 && WQ_CAP - x->wlen < VMRT_HDR_LEN + len) {
		memmove(x->wq, x->wq + x->woff, x->wlen - x->woff);
		x->wlen -= x->woff;
		x->woff = 0;
	}
	if (WQ_CAP - x->wlen < VMRT_HDR_LEN + len) {
		if (!x->is_main) { /* cannot happen: output is only read with room */
			con("exec port %d: queue full, frame dropped", x->idx);
			return;
		}
		main_flush();
	}
	vmrt_frame_header(x->wq + x->wlen, type, (uint32_t)len);
	if (len)
		memcpy(x->wq + x->wlen + VMRT_HDR_LEN, payload, len);
	x->wlen += VMRT_HDR_LEN + len;
}

/* A frame on the agent port, written out before returning. */
static void send_frame(uint8_t type, const void *payload, size_t len)
{
	sess_send(MAIN, type, payload, len);
	main_flush();
}

/* Length of s[0..n) without a UTF-8 sequence cut off at its end. */
static size_t utf8_trim(const uint8_t *s, size_t n)
{
	size_t i = n;

	while (i > 0 && n - i < 4 && (s[i - 1] & 0xC0) == 0x80)
		i--;
	if (i > 0 && s[i - 1] >= 0xC0) {
		uint8_t c = s[i - 1];
		size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
		if (n - (i - 1) < need)
			return i - 1;
	}
	return n;
}

static void sess_error(struct session *x, uint32_t code, const char *msg)
{
	uint8_t p[4 + 1024];
	size_t n = strlen(msg);

	if (n > sizeof p - 4)
		n = sizeof p - 4;
	n = utf8_trim((const uint8_t *)msg, n); /* messages may quote arguments */
	vmrt_put32(p, code);
	memcpy(p + 4, msg, n);
	for (size_t i = 4; i < 4 + n; i++) /* one line */
		if (p[i] == '\n' || p[i] == '\r')
			p[i] = ' ';
	if (x->is_main)
		con("error %u: %.*s", code, (int)n, (const char *)p + 4);
	else
		con("exec port %d: error %u: %.*s", x->idx, code, (int)n, (const char *)p + 4);
	sess_send(x, VMRT_ERROR, p, 4 + n);
}

static void send_error(uint32_t code, const char *msg)
{
	sess_error(MAIN, code, msg);
	main_flush();
}

/* Read what a port has into its session's rbuf.  Returns bytes read; 0 means
 * EOF (the host side is not connected); (size_t)-1 nothing to read now. */
static size_t port_read(struct session *x)
{
	if (x->rlen >= sizeof x->rbuf)
		return (size_t)-1;
	for (;;) {
		ssize_t n = read(x->fd, x->rbuf + x->rlen, sizeof x->rbuf - x->rlen);
		if (n > 0) {
			x->rlen += (size_t)n;
			return (size_t)n;
		}
		if (n == 0)
			return 0;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN)
			return (size_t)-1;
		if (!x->is_main)
			return 0;
		con("read(port): %s", strerror(errno));
		if (host_seen)
			host_gone();
		poweroff();
	}
}

static void protocol_error(const char *what) __attribute__((noreturn));
static void protocol_error(const char *what)
{
	char msg[512];

	snprintf(msg, sizeof msg, "agent: protocol error: %s", what);
	if (child > 0)
		kill(child, SIGKILL);
	send_error(125, msg);
	poweroff();
}

/* Take the next whole frame out of the agent port's rbuf into *f (payload
 * copied to pbuf).  Returns 1 if there was one, 0 if more bytes are needed. */
static int next_frame(struct vmrt_frame *f)
{
	char err[256];
	long n = vmrt_frame_parse(MAIN->rbuf, MAIN->rlen, VMRT_TO_AGENT, f, err, sizeof err);

	if (n < 0)
		protocol_error(err);
	if (n == 0)
		return 0;
	memcpy(pbuf, f->payload, f->len);
	f->payload = pbuf;
	memmove(MAIN->rbuf, MAIN->rbuf + n, MAIN->rlen - (size_t)n);
	MAIN->rlen -= (size_t)n;
	return 1;
}

static void fatal(int code, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (child > 0)
		kill(child, SIGKILL);
	send_error((uint32_t)code, msg);
	poweroff();
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

static int mkdir_p(const char *path, mode_t mode)
{
	char buf[PATH_MAX];
	size_t n = strlen(path);

	if (n == 0 || n >= sizeof buf) {
		errno = ENAMETOOLONG;
		return -1;
	}
	memcpy(buf, path, n + 1);
	for (char *p = buf + 1; ; p++) {
		if (*p == '/' || *p == '\0') {
			char c = *p;
			*p = '\0';
			if (mkdir(buf, mode) < 0 && errno != EEXIST)
				return -1;
			*p = c;
			if (c == '\0')
				break;
		}
	}
	return 0;
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

/* ---------------------------------------------------------------- network */

/* Set (up) or clear IFF_UP on an interface; -1 with errno on failure. */
static int if_set_up(int fd, const char *name, int up)
{
	struct ifreq ifr;

	memset(&ifr, 0, sizeof ifr);
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", name);
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0)
		return -1;
	if (!!(ifr.ifr_flags & IFF_UP) == up)
		return 0;
	if (up)
		ifr.ifr_flags |= IFF_UP;
	else
		ifr.ifr_flags &= ~IFF_UP;
	return ioctl(fd, SIOCSIFFLAGS, &ifr);
}

/* An AF_INET address (network byte order) into a struct sockaddr. */
static void put_inaddr(struct sockaddr *sa, uint32_t addr)
{
	struct sockaddr_in sin;

	memset(&sin, 0, sizeof sin);
	sin.sin_family = AF_INET;
	sin.sin_addr.s_addr = addr;
	memcpy(sa, &sin, sizeof sin);
}

/* Loopback up (the kernel adds 127.0.0.1/8 itself); with NET, eth0 (the VM's
 * only virtio-net NIC) gets its MAC, MTU, address and netmask, comes up and
 * gets a default route via the gateway.  Plain ioctls, no netlink.  Without
 * NET, eth0 stays down. */
static void setup_network(void)
{
	char dev[IFNAMSIZ] = "eth0";
	struct ifreq ifr;
	struct rtentry rt;
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

	if (fd < 0) {
		if (run.has_net)
			fatal(125, "network: socket: %s", strerror(errno));
		con("cannot bring up lo: socket: %s", strerror(errno));
		return;
	}
	if (if_set_up(fd, "lo", 1) < 0)
		con("cannot bring up lo: %s", strerror(errno));
	if (!run.has_net) {
		close(fd);
		return;
	}

	memset(&ifr, 0, sizeof ifr);
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", dev);
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0)
		fatal(125, "network: no eth0 in the VM: %s", strerror(errno));
	if (if_set_up(fd, dev, 0) < 0)
		fatal(125, "network: cannot take eth0 down: %s", strerror(errno));
	ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
	memcpy(ifr.ifr_hwaddr.sa_data, run.net_mac, sizeof run.net_mac);
	if (ioctl(fd, SIOCSIFHWADDR, &ifr) < 0)
		fatal(125, "network: cannot set the MAC address of eth0: %s", strerror(errno));
	if (run.net_mtu) {
		ifr.ifr_mtu = run.net_mtu;
		if (ioctl(fd, SIOCSIFMTU, &ifr) < 0)
			fatal(125, "network: cannot set the MTU of eth0 to %u: %s", run.net_mtu,
			      strerror(errno));
	}
	put_inaddr(&ifr.ifr_addr, run.net_addr);
	if (ioctl(fd, SIOCSIFADDR, &ifr) < 0)
		fatal(125, "network: cannot set the address of eth0: %s", strerror(errno));
	put_inaddr(&ifr.ifr_netmask, htonl(0xffffffffu << (32 - run.net_prefix)));
	if (ioctl(fd, SIOCSIFNETMASK, &ifr) < 0)
		fatal(125, "network: cannot set the netmask of eth0: %s", strerror(errno));
	if (if_set_up(fd, dev, 1) < 0)
		fatal(125, "network: cannot bring up eth0: %s", strerror(errno));
	if (run.net_gw) {
		memset(&rt, 0, sizeof rt);
		put_inaddr(&rt.rt_dst, 0);
		put_inaddr(&rt.rt_genmask, 0);
		put_inaddr(&rt.rt_gateway, run.net_gw);
		rt.rt_flags = RTF_UP | RTF_GATEWAY;
		rt.rt_dev = dev;
		if (ioctl(fd, SIOCADDRT, &rt) < 0)
			fatal(125, "network: cannot add the default route: %s", strerror(errno));
	}
	close(fd);
}

/* ---------------------------------------------------------------- rootfs */

static int is_dir(const char *path)
{
	struct stat st;
	return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static void must_mount(const char *src, const char *dst, const char *type,
		       unsigned long flags, const char *data)
{
	if (mkdir_p(dst, 0755) < 0 && !is_dir(dst))
		fatal(125, "cannot create mount point %s: %s", dst, strerror(errno));
	if (mount(src, dst, type, flags, data) < 0)
		fatal(125, "cannot mount %s%s%s on %s: %s", type ? type : "bind",
		      src ? " " : "", src ? src : "", dst, strerror(errno));
}

/* The image (read-only over virtio-fs) under a tmpfs upper layer.  A
 * read-only root gets the same overlay, remounted read-only by the child once
 * mount points and the working directory exist (as runc does). */
static void setup_rootfs(void)
{
	char opts[512];

	if (run.share_9p) /* a VM restored from a snapshot: its share is virtio-9p */
		must_mount(run.rootfs, SHARE, "9p", MS_NOSUID | MS_NODEV,
			   "trans=virtio,version=9p2000.L,cache=loose,msize=512000");
	else
		must_mount(run.rootfs, SHARE, "virtiofs", 0, NULL);
	if (!is_dir(LOWER))
		fatal(125, "the share has no rootfs directory");
	must_mount("tmpfs", RWDIR, "tmpfs", 0, "mode=0755");
	if (mkdir(RWDIR "/upper", 0755) < 0 || mkdir(RWDIR "/work", 0755) < 0)
		fatal(125, "cannot create overlay directories: %s", strerror(errno));
	snprintf(opts, sizeof opts, "lowerdir=%s,upperdir=%s/upper,workdir=%s/work", LOWER, RWDIR,
		 RWDIR);
	must_mount("overlay", ROOT, "overlay", 0, opts);
}

static void make_node(const char *name, unsigned maj, unsigned min)
{
	char path[PATH_MAX];

	snprintf(path, sizeof path, ROOT "/dev/%s", name);
	if (mknod(path, S_IFCHR | 0666, makedev(maj, min)) < 0 || chmod(path, 0666) < 0)
		fatal(125, "cannot create /dev/%s: %s", name, strerror(errno));
}

static void make_link(const char *target, const char *name)
{
	char path[PATH_MAX];

	snprintf(path, sizeof path, ROOT "/dev/%s", name);
	if (symlink(target, path) < 0)
		fatal(125, "cannot create /dev/%s: %s", name, strerror(errno));
}

/* The image decides what its /proc, /sys and /dev are; a symlink there would
 * make the agent mount over a path outside the container root. Replace it
 * with a directory in the writable layer, or refuse a read-only root. */
static void check_mount_point(const char *name)
{
	char path[PATH_MAX];
	struct stat st;

	snprintf(path, sizeof path, ROOT "/%s", name);
	if (lstat(path, &st) < 0 || S_ISDIR(st.st_mode))
		return;
	if (unlink(path) < 0 || mkdir(path, 0755) < 0)
		fatal(125, "cannot replace the image's /%s with a directory: %s", name, strerror(errno));
}

/* Resolve path inside the root fd: symlinks and ".." cannot leave it. */
static int open_in_root(int rootfd, const char *path, int flags)
{
	struct open_how how = { .flags = (uint64_t)(flags | O_CLOEXEC),
				.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS };
	return (int)syscall(SYS_openat2, rootfd, path, &how, sizeof how);
}

/* An O_PATH fd of target inside the root, creating missing components as
 * directories (the last one as an empty file when want_file).  Every step is
 * resolved in the root, so a symlink in the image or a volume cannot point it
 * outside; a dangling symlink on the way is followed inside the root and the
 * directories it names are created there (as runc's securejoin + MkdirAll). */
static int make_target_at(int rootfd, const char *target, int want_file, int depth)
{
	char buf[PATH_MAX], link[PATH_MAX], next[PATH_MAX];
	size_t n = strlen(target);

	if (depth > 40)
		return errno = ELOOP, -1;
	if (n >= sizeof buf)
		return errno = ENAMETOOLONG, -1;
	memcpy(buf, target, n + 1);
	for (size_t i = 1; i <= n; i++) {
		if (buf[i] != '/' && buf[i] != '\0')
			continue;
		if (buf[i - 1] == '/')
			continue;
		char save = buf[i];
		int last = save == '\0' || buf[i + 1] == '\0';
		buf[i] = '\0';
		int fd = open_in_root(rootfd, buf, O_PATH);
		if (fd < 0 && errno == ENOENT) {
			char *slash = strrchr(buf, '/');
			*slash = '\0';
			int parent = open_in_root(rootfd, buf[0] ? buf : "/", O_PATH | O_DIRECTORY);
			*slash = '/';
			if (parent < 0)
				return -1;
			ssize_t ln = readlinkat(parent, slash + 1, link, sizeof link - 1);
			if (ln >= 0) { /* dangling: continue from where it points */
				link[ln] = '\0';
				*slash = '\0';
				int w = snprintf(next, sizeof next, "%s/%s%s%s", link[0] == '/' ? "" : buf, link,
						 save ? "/" : "", save ? buf + i + 1 : "");
				close(parent);
				if (w < 0 || (size_t)w >= sizeof next)
					return errno = ENAMETOOLONG, -1;
				return make_target_at(rootfd, next, want_file, depth + 1);
			}
			int r;
			if (last && want_file) {
				r = openat(parent, slash + 1, O_CREAT | O_EXCL | O_WRONLY | O_NOFOLLOW | O_CLOEXEC, 0644);
				if (r >= 0)
					close(r);
			} else {
				r = mkdirat(parent, slash + 1, 0755);
			}
			close(parent);
			if (r < 0 && errno != EEXIST)
				return -1;
			fd = open_in_root(rootfd, buf, O_PATH);
		}
		if (fd < 0)
			return -1;
		buf[i] = save;
		if (last)
			return fd;
		close(fd);
	}
	return open_in_root(rootfd, "/", O_PATH);
}

static int make_target(int rootfd, const char *target, int want_file)
{
	return make_target_at(rootfd, target, want_file, 0);
}

static unsigned long mount_flags(uint32_t f)
{
	return (f & VMRT_MNT_RO ? MS_RDONLY : 0) | (f & VMRT_MNT_NOSUID ? MS_NOSUID : 0) |
	       (f & VMRT_MNT_NODEV ? MS_NODEV : 0) | (f & VMRT_MNT_NOEXEC ? MS_NOEXEC : 0);
}

/* Volumes: binds of share/<source> and tmpfs mounts, at targets resolved in
 * the container root; mounted through /proc/self/fd, as runc does. */
static void setup_user_mounts(void)
{
	int rootfd = open(ROOT, O_PATH | O_DIRECTORY | O_CLOEXEC);

	if (rootfd < 0)
		fatal(125, "cannot open the container root: %s", strerror(errno));
	for (size_t k = 0; k < run.nmounts; k++) {
		const struct vmrt_mount *m = &run.mounts[k];
		int tmpfs = (m->flags & VMRT_MNT_TMPFS) != 0;
		char src[PATH_MAX], fdpath[64];
		struct stat st;
		int fd;

		if (!tmpfs) {
			snprintf(src, sizeof src, SHARE "/%s", m->source);
			if (lstat(src, &st) < 0)
				fatal(125, "volume source for %s: %s", m->target, strerror(errno));
		}
		fd = make_target(rootfd, m->target, !tmpfs && !S_ISDIR(st.st_mode));
		if (fd < 0)
			fatal(125, "cannot create mount point %s: %s", m->target, strerror(errno));
		snprintf(fdpath, sizeof fdpath, "/proc/self/fd/%d", fd);
		if (tmpfs) {
			if (mount("tmpfs", fdpath, "tmpfs", mount_flags(m->flags), m->data[0] ? m->data : NULL) < 0)
				fatal(125, "cannot mount tmpfs on %s: %s", m->target, strerror(errno));
		} else if (mount(src, fdpath, NULL, MS_BIND | MS_REC, NULL) < 0) {
			fatal(125, "cannot mount volume on %s: %s", m->target, strerror(errno));
		}
		close(fd);
		if (!tmpfs && (m->flags & VMRT_MNT_RO)) {
			fd = open_in_root(rootfd, m->target, O_PATH);
			snprintf(fdpath, sizeof fdpath, "/proc/self/fd/%d", fd);
			if (fd < 0 || mount(NULL, fdpath, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL) < 0)
				fatal(125, "cannot make volume %s read-only: %s", m->target, strerror(errno));
			close(fd);
		}
	}
	close(rootfd);
}

/* Everything but /proc, which needs the container's PID namespace and is
 * mounted by the child. */
static void setup_container_mounts(void)
{
	check_mount_point("proc");
	check_mount_point("sys");
	check_mount_point("dev");
	if (mkdir(ROOT "/proc", 0555) < 0 && !is_dir(ROOT "/proc"))
		fatal(125, "cannot create mount point /proc: %s", strerror(errno));
	must_mount("sysfs", ROOT "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NOEXEC | MS_NODEV, NULL);
	must_mount("tmpfs", ROOT "/dev", "tmpfs", MS_NOSUID | MS_STRICTATIME, "mode=0755,size=65536k");
	make_node("null", 1, 3);
	make_node("zero", 1, 5);
	make_node("full", 1, 7);
	make_node("random", 1, 8);
	make_node("urandom", 1, 9);
	make_node("tty", 5, 0);
	make_link("/proc/self/fd", "fd");
	make_link("/proc/self/fd/0", "stdin");
	make_link("/proc/self/fd/1", "stdout");
	make_link("/proc/self/fd/2", "stderr");
	make_link("pts/ptmx", "ptmx");
	if (run.tty) {
		/* placeholder for the bind mount of the terminal */
		int fd = open(ROOT "/dev/console", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
		if (fd >= 0)
			close(fd);
	}
	must_mount("devpts", ROOT "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
		   "newinstance,ptmxmode=0666,mode=0620,gid=5");
	must_mount("shm", ROOT "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
		   "mode=1777,size=65536k");
	setup_user_mounts();
}

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
static void stdio_close_child(struct stdio *s)
{
	if (s->child_in != s->child_out && s->child_in != s->child_err)
		close_fd(&s->child_in);
	if (s->child_err != s->child_out)
		close_fd(&s->child_err);
	close_fd(&s->child_out);
	s->child_in = s->child_err = -1;
}

/* Close our ends. */
static void stdio_close(struct stdio *s)
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
static int stdio_open(struct stdio *s, const struct vmrt_run *r, int devnull, char *pts,
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

static int errpipe_w = -1;

/* A cgroup v2 memory cgroup for the container, for the EXIT OOM flag. */
#define CGROUP "/sys/fs/cgroup/vmrt"
static int cgroup_ok;

static int write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = write(fd, text, strlen(text));
	close(fd);
	return n == (ssize_t)strlen(text) ? 0 : -1;
}

static void setup_cgroup(void)
{
	if (mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NOEXEC | MS_NODEV, NULL) < 0 ||
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
static void apply_identity(const struct vmrt_run *who)
{
	gid_t groups[VMRT_MAX_GROUPS];

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

static void child_main(const struct stdio *s) __attribute__((noreturn));
static void child_main(const struct stdio *s)
{
	char text[512];

	child_enter(s, run.tty);

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
	if (run.readonly && mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL) < 0)
		child_fail(125, "cannot make the root read-only: %s", strerror(errno));

	apply_identity(&run);

	/* everything above 2 closes on exec (the error pipe is O_CLOEXEC) */
	if (syscall(SYS_close_range, 3u, ~0u, 4u /* CLOSE_RANGE_CLOEXEC */) < 0) {
		for (int fd = 3; fd < 4096; fd++)
			if (fd != errpipe_w)
				close(fd);
	}
	child_exec(&run);
}

/* ---------------------------------------------------------------- main loop */

/* An exec process: forked by the agent into the container's PID namespace;
 * joins its cgroup and mount namespace (whose root is the container root:
 * it was moved over "/" there), then runs as the EXEC says. */
static void exec_child_main(const struct stdio *s, const struct vmrt_run *r, int mntns)
	__attribute__((noreturn));
static void exec_child_main(const struct stdio *s, const struct vmrt_run *r, int mntns)
{
	child_enter(s, r->tty);
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
	child_exec(r);
}

/* ---------------------------------------------------------------- main loop */

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
static uint64_t oom_kills(void)
{
	if (cgroup_ok)
		return read_oom_kill(CGROUP "/memory.events");
	return read_oom_kill("/proc/vmstat");
}

static int sfd = -1;         /* signalfd for SIGCHLD */
static int self_pidns = -1;  /* the agent's own PID namespace */

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

/* What a child wrote to its close-on-exec error pipe: 0 if nothing (the exec
 * succeeded), else 1 with the code and the message. */
static int read_errpipe(int fd, uint32_t *code, char *msg, size_t msglen)
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
static void supervise(void)
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
				queue_exit(MAIN);
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
static void linger(int ms)
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

/* ---------------------------------------------------------------- main */

static void sessions_init(void)
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

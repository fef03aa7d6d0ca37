/* Frames to and from the virtio-serial ports (agent.h): each session's
 * queue to its host, the agent port's blocking writes, ERROR frames, reads,
 * and the protocol errors and setup failures that end the VM. */
#include "agent.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

uint8_t pbuf[VMRT_MAX_PAYLOAD];

void host_gone(void)
{
	con("host disconnected");
	poweroff();
}

/* Wait until the agent port is ready for events (POLLIN or POLLOUT).  Before
 * RUN a hang-up means the host side is not connected yet (virtio-serial
 * reports POLLHUP until QEMU says the chardev is open): wait up to
 * PORT_WAIT_MS for it.  After RUN it means the host is gone.  Returns the
 * revents. */
short port_wait(short events, int timeout_ms)
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
void sess_flush(struct session *x)
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
void main_flush(void)
{
	port_write_all(MAIN->wq + MAIN->woff, MAIN->wlen - MAIN->woff);
	MAIN->woff = MAIN->wlen = 0;
}

/* Queue a frame for a session's host. */
void sess_send(struct session *x, uint8_t type, const void *payload, size_t len)
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
void send_frame(uint8_t type, const void *payload, size_t len)
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

void sess_error(struct session *x, uint32_t code, const char *msg)
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

void send_error(uint32_t code, const char *msg)
{
	sess_error(MAIN, code, msg);
	main_flush();
}

/* Read what a port has into its session's rbuf.  Returns bytes read; 0 means
 * EOF (the host side is not connected); (size_t)-1 nothing to read now. */
size_t port_read(struct session *x)
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

void protocol_error(const char *what)
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
int next_frame(struct vmrt_frame *f)
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

void fatal(int code, const char *fmt, ...)
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

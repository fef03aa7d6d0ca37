/* Shared by the monitor's libFuzzer targets: monitor.c compiled into the
 * target (its main renamed), with the calls that would act on the world
 * (signals, exec, exit, waiting for children, closing every fd) replaced by
 * recording stand-ins, and a strict reader for the json-file log it writes.
 *
 * The system headers monitor.c uses are included first, so the macros below
 * rename only monitor.c's own calls, never the headers' declarations. */
#ifndef VMRT_MONITOR_FUZZ_HARNESS_H
#define VMRT_MONITOR_FUZZ_HARNESS_H

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

static void check(int cond)
{
	if (!cond)
		__builtin_trap();
}

/* ---------------------------------------------------------------- stand-ins */

static jmp_buf fz_done;      /* where finish()'s exec (or an exit) lands */
static int fz_armed;         /* fz_done is set */
static int fz_exit_code = -1;
static char fz_how[32], fz_value[64], fz_detail[2048];
static int fz_finished, fz_oom;
static int fz_kills, fz_last_sig;

static int fz_kill(pid_t pid, int sig)
{
	check(pid > 0); /* kill(-1 or 0, ...) would reach far more than the container */
	fz_kills++;
	fz_last_sig = sig;
	return 0;
}

static long fz_syscall(long nr, ...)
{
	(void)nr;
	fz_kills++;
	return 0;
}

/* finish() execs the finish command: record HOW VALUE OOM DETAIL, free its argv, land. */
static int fz_execv(const char *path, char *const argv[])
{
	size_t n = 0;

	(void)path;
	while (argv[n])
		n++;
	check(n >= 6);
	snprintf(fz_how, sizeof fz_how, "%s", argv[n - 5]);
	snprintf(fz_value, sizeof fz_value, "%s", argv[n - 4]);
	fz_oom = !strcmp(argv[n - 3], "1");
	check(fz_oom || !strcmp(argv[n - 3], "0"));
	check(strlen(argv[n - 2]) < sizeof fz_detail);
	snprintf(fz_detail, sizeof fz_detail, "%s", argv[n - 2]);
	fz_finished = 1;
	free((void *)argv);
	check(fz_armed);
	longjmp(fz_done, 1);
}

static void fz_exit(int code) __attribute__((noreturn));
static void fz_exit(int code)
{
	fz_exit_code = code;
	check(fz_armed);
	longjmp(fz_done, 2);
}

static pid_t fz_waitpid(pid_t pid, int *st, int opts)
{
	(void)opts;
	if (pid <= 0)
		return 0; /* reap(): nothing more */
	*st = 9;      /* killed */
	return pid;
}

static int fz_zero(void)
{
	return 0;
}

static ssize_t fz_write(int fd, const void *p, size_t n)
{
	if (fd == 2)
		return (ssize_t)n; /* say(): not the fuzzer's output */
	return write(fd, p, n);
}

#define kill(pid, sig) fz_kill(pid, sig)
#define syscall(...) fz_syscall(__VA_ARGS__)
#define execv(path, argv) fz_execv(path, argv)
#define _exit(code) fz_exit(code)
#define exit(code) fz_exit(code)
#define waitpid(pid, st, opts) fz_waitpid(pid, st, opts)
#define close_range(a, b, c) ((void)(a), (void)(b), (void)(c), fz_zero())
#define sigprocmask(a, b, c) ((void)(a), (void)(b), (void)(c), fz_zero())
#define signal(s, h) ((void)(s), (void)(h), SIG_DFL)
#define nanosleep(a, b) ((void)(a), (void)(b), fz_zero())
#define prctl(...) fz_zero()
#define write(fd, p, n) fz_write(fd, p, n)
#define main monitor_main

#include "../monitor.c"

#undef main
#undef write
#undef kill
#undef exit
#undef _exit

/* The monitor runs with SIGPIPE ignored (main()): so does the target. */
static __attribute__((unused)) void ignore_sigpipe(void)
{
	struct sigaction sa = { .sa_handler = SIG_IGN };

	check(sigaction(SIGPIPE, &sa, NULL) == 0);
}

/* ---------------------------------------------------------------- the log */

/* Bytes as the log must show them: valid UTF-8 kept, each other byte U+FFFD. */
static __attribute__((unused)) size_t sanitize(const uint8_t *s, size_t n, uint8_t *out)
{
	size_t o = 0;

	for (size_t i = 0; i < n;) {
		size_t k = s[i] < 0x80 ? 1 : vmrt_utf8_seq(s + i, n - i);

		if (k == 0) {
			memcpy(out + o, "\xef\xbf\xbd", 3);
			o += 3;
			i++;
		} else {
			memcpy(out + o, s + i, k);
			o += k;
			i += k;
		}
	}
	return o;
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

static const char *expect(const char *p, const char *end, const char *lit)
{
	size_t n = strlen(lit);

	check((size_t)(end - p) >= n && !memcmp(p, lit, n));
	return p + n;
}

static const char *digits(const char *p, const char *end, int n)
{
	check(end - p >= n);
	for (int i = 0; i < n; i++)
		check(p[i] >= '0' && p[i] <= '9');
	return p + n;
}

/* One json-file record at p: {"log":"...","stream":"stdout|stderr","time":"...Z"}\n,
 * strictly (no raw control character, valid UTF-8, only the escapes monitor.c
 * writes).  The log string decoded into out/outlen; *is_err: the stream.
 * Returns the start of the next line. */
static const char *parse_record(const char *p, const char *end, uint8_t *out, size_t *outlen, int *is_err)
{
	size_t o = 0;

	p = expect(p, end, "{\"log\":\"");
	for (;;) {
		uint8_t c;

		check(p < end);
		c = (uint8_t)*p;
		if (c == '"')
			break;
		check(c >= 0x20);
		if (c >= 0x80) {
			size_t k = vmrt_utf8_seq((const uint8_t *)p, (size_t)(end - p));

			check(k > 0);
			memcpy(out + o, p, k);
			o += k;
			p += k;
			continue;
		}
		p++;
		if (c != '\\') {
			out[o++] = c;
			continue;
		}
		check(p < end);
		switch (*p++) {
		case '"': out[o++] = '"'; break;
		case '\\': out[o++] = '\\'; break;
		case 'n': out[o++] = '\n'; break;
		case 'r': out[o++] = '\r'; break;
		case 't': out[o++] = '\t'; break;
		case 'b': out[o++] = '\b'; break;
		case 'f': out[o++] = '\f'; break;
		case 'u': {
			unsigned cp = 0;

			check(end - p >= 4);
			for (int i = 0; i < 4; i++) {
				int v = hexval(p[i]);

				check(v >= 0);
				cp = cp << 4 | (unsigned)v;
			}
			p += 4;
			if (cp < 0x20) {
				out[o++] = (uint8_t)cp;
			} else {
				check(cp == 0xfffd); /* the only other escape monitor.c writes */
				memcpy(out + o, "\xef\xbf\xbd", 3);
				o += 3;
			}
			break;
		}
		default:
			check(0);
		}
	}
	p = expect(p, end, "\",\"stream\":\"");
	check(end - p >= 6);
	*is_err = !memcmp(p, "stderr", 6);
	check(*is_err || !memcmp(p, "stdout", 6));
	p = expect(p + 6, end, "\",\"time\":\"");
	p = digits(p, end, 4);
	p = expect(p, end, "-");
	p = digits(p, end, 2);
	p = expect(p, end, "-");
	p = digits(p, end, 2);
	p = expect(p, end, "T");
	p = digits(p, end, 2);
	p = expect(p, end, ":");
	p = digits(p, end, 2);
	p = expect(p, end, ":");
	p = digits(p, end, 2);
	p = expect(p, end, ".");
	p = digits(p, end, 6);
	p = expect(p, end, "Z\"}\n");
	*outlen = o;
	return p;
}

/* The whole of a file, into a malloc'd buffer (NULL, 0 if it does not exist). */
static __attribute__((unused)) char *slurp(const char *path, size_t *n)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	char *buf;
	size_t got = 0;

	*n = 0;
	if (fd < 0) {
		check(errno == ENOENT);
		return NULL;
	}
	check(fstat(fd, &st) == 0);
	buf = malloc((size_t)st.st_size + 1);
	check(buf != NULL);
	while (got < (size_t)st.st_size) {
		ssize_t r = read(fd, buf + got, (size_t)st.st_size - got);

		check(r > 0);
		got += (size_t)r;
	}
	close(fd);
	*n = got;
	return buf;
}

#endif

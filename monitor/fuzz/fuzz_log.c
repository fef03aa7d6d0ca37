/* libFuzzer target: the monitor's json-file log writer, fed the container's
 * arbitrary output bytes.
 *
 * The input is a script.  Byte 0 sets the log cap (--log-max-size: none, or
 * 200 B .. 51 KB; --log-max-file 1..4).  Then ops of [op][u16 length][bytes]:
 * bytes written to the container's stdout or stderr pipe and read by
 * stream_read() (process mode), or handed to stream_feed() (an agent's
 * STDOUT/STDERR frame, VM mode).  At the end both streams are flushed, as
 * finish() does.
 *
 * Checked: every log file holds only complete, strict json-file records (no
 * raw control characters, valid UTF-8, the fields in order), each of which
 * decodes to exactly the bytes an independent model of Docker's json-file
 * splitting expects (a line, or 16 KiB of a longer one; invalid UTF-8 as
 * U+FFFD); the records kept are the newest, in order; rotation keeps at most
 * max-file files, each within max-size unless it holds a single record.
 * Also: the civil-date code of the timestamps against gmtime_r, and
 * read_status() (the pool daemon's status files) on the input's head. */
#include "harness.h"

#include <sys/ioctl.h>
#include <sys/mman.h>

#define MAX_RECORDS (1 << 17) /* a 128 KiB input of newlines */

struct rec {
	size_t off, len; /* in model[] */
	int is_err;
};

static char dir[256];
static char logpath[300];
static uint8_t model[1 << 20];  /* the expected records' decoded bytes, back to back */
static size_t model_len;
static struct rec recs[MAX_RECORDS];
static size_t nrecs;
static uint8_t pend[2][LOG_PIECE]; /* the model's unfinished line per stream */
static size_t pend_len[2];
static uint8_t dec[LOG_PIECE * 3 + 16];

static void cleanup(void)
{
	char p[320];

	for (int i = 0; i <= 6; i++) {
		snprintf(p, sizeof p, i ? "%s.%d" : "%s", logpath, i);
		unlink(p);
	}
	rmdir(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	const char *tmp = getenv("TMPDIR");

	(void)argc;
	(void)argv;
	ignore_sigpipe();
	snprintf(dir, sizeof dir, "%s/fzlog.XXXXXX", tmp && strlen(tmp) < 200 ? tmp : "/tmp");
	check(mkdtemp(dir) != NULL);
	snprintf(logpath, sizeof logpath, "%s/container.log", dir);
	atexit(cleanup);
	return 0;
}

/* The model: Docker's json-file splitting, byte by byte. */
static void model_emit(int e)
{
	check(nrecs < MAX_RECORDS);
	recs[nrecs].off = model_len;
	recs[nrecs].len = sanitize(pend[e], pend_len[e], model + model_len);
	recs[nrecs].is_err = e;
	model_len += recs[nrecs].len;
	check(model_len <= sizeof model - 3 * LOG_PIECE);
	nrecs++;
	pend_len[e] = 0;
}

static void model_feed(int e, const uint8_t *d, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		pend[e][pend_len[e]++] = d[i];
		if (d[i] == '\n' || pend_len[e] == LOG_PIECE)
			model_emit(e);
	}
}

static void check_stamp(const uint8_t *d, size_t n)
{
	uint64_t v = 0;
	struct timespec ts;
	struct tm tm;
	char got[128], want[128];

	for (size_t i = 0; i < 8 && i < n; i++)
		v = v << 8 | d[i];
	ts.tv_sec = (time_t)(v % 253402300800ull); /* up to 9999-12-31 */
	ts.tv_nsec = (long)((v >> 20) % 1000000000ull);
	check(utc_stamp("stdout", ts, got, sizeof got) > 0);
	check(gmtime_r(&ts.tv_sec, &tm) != NULL);
	snprintf(want, sizeof want, "\",\"stream\":\"stdout\",\"time\":\"%04d-%02d-%02dT%02d:%02d:%02d.%06ldZ\"}\n",
		 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
		 ts.tv_nsec / 1000);
	check(!strcmp(got, want));
}

static void check_status(const uint8_t *d, size_t n)
{
	char path[64], value[32];
	int fd = memfd_create("status", MFD_CLOEXEC);

	check(fd >= 0);
	n = n < 40 ? n : 40;
	check(write(fd, d, n) == (ssize_t)n);
	snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
	if (read_status(path, value, sizeof value)) {
		char *e;
		long v = strtol(value, &e, 10);

		check(*value && !*e && v >= INT32_MIN && v <= INT32_MAX);
	}
	close(fd);
}

static void reset(uint8_t conf)
{
	cleanup();
	check(mkdir(dir, 0700) == 0 || errno == EEXIST);
	log_path = logpath;
	log_max_size = (conf & 7) ? 200 + (int64_t)(conf >> 3) * 1600 : 0;
	log_max_file = 1 + (conf >> 6);
	log_size = 0;
	log_failed = 0;
	partial = 0; /* Docker's splitting, which the model checks */
	log_fd = open(logpath, O_WRONLY | O_APPEND | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	check(log_fd >= 0);
	out_s = (struct stream){ .fd = -1, .name = "stdout" };
	err_s = (struct stream){ .fd = -1, .name = "stderr" };
	model_len = nrecs = 0;
	pend_len[0] = pend_len[1] = 0;
}

/* Process mode: the bytes through a pipe and stream_read(), as the poll loop would. */
static void via_pipe(struct stream *s, const uint8_t *d, size_t n)
{
	int p[2];
	size_t off = 0;

	check(pipe2(p, O_NONBLOCK | O_CLOEXEC) == 0);
	s->fd = p[0];
	while (off < n) {
		ssize_t w = write(p[1], d + off, n - off);

		if (w > 0)
			off += (size_t)w;
		stream_read(s); /* never at EOF here: the write end is open */
		check(s->fd == p[0]);
	}
	for (;;) {
		int avail = 0;

		check(ioctl(p[0], FIONREAD, &avail) == 0);
		if (avail == 0)
			break;
		stream_read(s);
	}
	close(p[1]);
	stream_read(s); /* EOF: flushed and closed, as for a container's exit */
	check(s->fd == -1);
}

/* Each log file's records, oldest file first (container.log.N .. .1, container.log):
 * counted (compare == 0) or compared with the model's records from *idx on. */
static size_t scan(int compare, size_t *idx)
{
	size_t files = 0;
	char p[320];

	for (long i = log_max_file + 1; i >= 0; i--) {
		size_t n, k = 0, len;
		int is_err;
		char *buf;
		const char *q, *end;

		snprintf(p, sizeof p, i ? "%s.%ld" : "%s", logpath, i);
		buf = slurp(p, &n);
		if (!buf)
			continue;
		files++;
		check(i < log_max_file); /* never more than max-file files */
		for (q = buf, end = buf + n; q < end; k++, (*idx)++) {
			q = parse_record(q, end, dec, &len, &is_err);
			if (compare) {
				const struct rec *r = &recs[*idx];

				check(*idx < nrecs);
				check(is_err == r->is_err && len == r->len && !memcmp(dec, model + r->off, len));
			}
		}
		if (log_max_size > 0) /* within max-size, or one record too big for it */
			check((int64_t)n <= log_max_size || k == 1);
		free(buf);
	}
	return files;
}

static void verify(void)
{
	size_t kept = 0, idx, files = scan(0, &kept);

	check(files >= 1 && kept <= nrecs);
	if (log_max_size == 0)
		check(kept == nrecs);
	/* what is kept is the newest records, in order */
	idx = nrecs - kept;
	scan(1, &idx);
	check(idx == nrecs);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	size_t off = 1;

	if (size == 0)
		return 0;
	check_stamp(data + 1, size - 1);
	check_status(data + 1, size - 1);
	reset(data[0]);
	while (off + 3 <= size) {
		uint8_t op = data[off];
		size_t n = (size_t)data[off + 1] | (size_t)data[off + 2] << 8;
		const uint8_t *d = data + off + 3;
		int e = op & 1;
		struct stream *s = e ? &err_s : &out_s;

		if (n > size - off - 3)
			n = size - off - 3;
		off += 3 + n;
		if (op & 2) {
			via_pipe(s, d, n);
			model_feed(e, d, n);
			if (pend_len[e])
				model_emit(e); /* the pipe's EOF flushed the rest */
		} else {
			stream_feed(s, d, n);
			model_feed(e, d, n);
		}
	}
	stream_flush(&out_s);
	if (pend_len[0])
		model_emit(0);
	stream_flush(&err_s);
	if (pend_len[1])
		model_emit(1);
	verify();
	if (log_fd >= 0)
		close(log_fd);
	log_fd = -1;
	return 0;
}

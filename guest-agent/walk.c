/* The writable layer's walk (agent.h; WALK_UPPER, docs/agent-protocol.md
 * "The walk stream"): a process whose RUN or EXEC has WALK_UPPER lists the
 * overlay's upper dir, RWDIR "/upper", on its stdout instead of exec'ing its
 * ARG, for the host's `docker diff`: the host never reads the container's
 * disk itself.
 *
 * It runs in the agent's own mount namespace (the upper dir is not visible
 * in the container's), with only the capabilities reading it takes
 * (child.c).  Every directory is opened relative to its parent with
 * O_NOFOLLOW | O_DIRECTORY and every entry is lstat'ed through that fd
 * (fstatat AT_SYMLINK_NOFOLLOW): a symbolic link the container left is never
 * followed.  What the container removes or replaces meanwhile (it may run)
 * is skipped.  Bounded: at most WALK_DEPTH_MAX components and WALK_PATH_MAX
 * bytes in a path, WALK_ENTRIES_MAX entries; past one the walk fails (exit
 * 1 and a line on stderr, as on any error). */
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>

#define WALK_MAGIC "VMRTWLK1"
#define WALK_REC 32u                /* a record's fixed header; its path follows */
#define WALK_DEPTH_MAX 512u         /* components of a path */
#define WALK_PATH_MAX 4096u         /* bytes of a path */
#define WALK_ENTRIES_MAX 500000u
#define NS 1000000000LL

static char path[WALK_PATH_MAX + 1]; /* the entry's path, relative to the upper dir */
static uint8_t obuf[1 << 16];
static size_t olen;
static uint64_t count;

static void walk_fail(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void walk_fail(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n = snprintf(buf, sizeof buf, "vmrt-agent: walk: ");

	va_start(ap, fmt);
	n += vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
	va_end(ap);
	if ((size_t)n > sizeof buf - 2)
		n = (int)sizeof buf - 2;
	buf[n++] = '\n';
	(void)!write(2, buf, (size_t)n);
	_exit(1);
}

static void flush_out(void)
{
	size_t off = 0;

	while (off < olen) {
		ssize_t w = write(1, obuf + off, olen - off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			walk_fail("cannot write the walk: %s", strerror(errno));
		off += (size_t)w;
	}
	olen = 0;
}

static void out(const void *p, size_t n)
{
	if (n > sizeof obuf - olen)
		flush_out();
	memcpy(obuf + olen, p, n); /* n <= WALK_REC + WALK_PATH_MAX < sizeof obuf */
	olen += n;
}

/* st's mtime in ns since the epoch, saturated to what an i64 holds */
static int64_t mtime_ns(const struct stat *st)
{
	if (st->st_mtim.tv_sec >= INT64_MAX / NS)
		return INT64_MAX;
	if (st->st_mtim.tv_sec <= INT64_MIN / NS)
		return INT64_MIN;
	return (int64_t)st->st_mtim.tv_sec * NS + st->st_mtim.tv_nsec;
}

/* One record: u16 path length, u8 type, u8 flags (bit 0: an opaque
 * directory), u32 permission bits, u64 size, i64 mtime ns, u32 rdev major,
 * u32 rdev minor (devices only), then the path. */
static void emit(size_t plen, const struct stat *st, int opaque)
{
	uint8_t h[WALK_REC];
	int dev = 0;
	char type;

	switch (st->st_mode & S_IFMT) {
	case S_IFDIR: type = 'd'; break;
	case S_IFREG: type = 'f'; break;
	case S_IFLNK: type = 'l'; break;
	case S_IFCHR: type = 'c'; dev = 1; break;
	case S_IFBLK: type = 'b'; dev = 1; break;
	case S_IFIFO: type = 'p'; break;
	case S_IFSOCK: type = 's'; break;
	default: walk_fail("%.200s has an unknown file type", path);
	}
	if (++count > WALK_ENTRIES_MAX)
		walk_fail("the writable layer has more than %u entries", WALK_ENTRIES_MAX);
	vmrt_put16(h, (uint16_t)plen);
	h[2] = (uint8_t)type;
	h[3] = opaque ? 1 : 0;
	vmrt_put32(h + 4, (uint32_t)(st->st_mode & 07777));
	vmrt_put64(h + 8, (uint64_t)st->st_size);
	vmrt_put64(h + 16, (uint64_t)mtime_ns(st));
	vmrt_put32(h + 24, dev ? major(st->st_rdev) : 0);
	vmrt_put32(h + 28, dev ? minor(st->st_rdev) : 0);
	out(h, sizeof h);
	out(path, plen);
}

/* The entries of directory dfd, whose path (depth components) is
 * path[0..plen), and below each directory among them. */
static void walk_dir(int dfd, size_t plen, unsigned depth)
{
	char buf[4096] __attribute__((aligned(8)));

	for (;;) {
		ssize_t n = getdents64(dfd, buf, sizeof buf);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			walk_fail("cannot read /%.200s: %s", path, strerror(errno));
		if (n == 0)
			return;
		for (ssize_t off = 0; off < n;) {
			const struct dirent64 *d = (const struct dirent64 *)(const void *)(buf + off);
			const char *name = d->d_name;
			size_t nlen = strlen(name), len = plen + (plen ? 1 : 0) + nlen;
			struct stat st;
			int sub;
			char v[2];

			off += d->d_reclen;
			if (!strcmp(name, ".") || !strcmp(name, ".."))
				continue;
			path[plen] = '\0';
			if (depth + 1 > WALK_DEPTH_MAX)
				walk_fail("deeper than %u directories at /%.200s", WALK_DEPTH_MAX, path);
			if (len > WALK_PATH_MAX)
				walk_fail("a path longer than %u bytes in /%.200s", WALK_PATH_MAX, path);
			if (plen)
				path[plen] = '/';
			memcpy(path + len - nlen, name, nlen);
			path[len] = '\0';
			if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
				if (errno == ENOENT)
					continue; /* removed meanwhile */
				walk_fail("cannot stat /%.200s: %s", path, strerror(errno));
			}
			if (!S_ISDIR(st.st_mode)) {
				emit(len, &st, 0);
				continue;
			}
			sub = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_NOCTTY | O_CLOEXEC);
			if (sub < 0) {
				if (errno == ENOENT || errno == ENOTDIR || errno == ELOOP)
					continue; /* replaced meanwhile */
				walk_fail("cannot open /%.200s: %s", path, strerror(errno));
			}
			if (fstat(sub, &st) < 0)
				walk_fail("cannot stat /%.200s: %s", path, strerror(errno));
			emit(len, &st, fgetxattr(sub, "trusted.overlay.opaque", v, sizeof v) == 1 && v[0] == 'y');
			walk_dir(sub, len, depth + 1);
			close(sub);
		}
	}
}

void walk_upper(void)
{
	uint8_t end[WALK_REC];
	int root = open(RWDIR "/upper", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

	if (root < 0)
		walk_fail("cannot open the writable layer: %s", strerror(errno));
	out(WALK_MAGIC, sizeof WALK_MAGIC - 1);
	walk_dir(root, 0, 0);
	close(root);
	memset(end, 0, sizeof end); /* path length 0: the end, its size the count */
	vmrt_put64(end + 8, count);
	out(end, sizeof end);
	flush_out();
	_exit(0);
}

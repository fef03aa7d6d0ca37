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
 * 1 and a line on stderr, as on any error).
 *
 * With WALK_CONTENT too (a build's RUN step, vmrt/build.py) the stream is
 * "VMRTWLK2": each record also carries the owner, the user.* and
 * security.capability xattrs and, after them, a regular file's content, a
 * symbolic link's target or, for a second name of a hard-linked file, the
 * path listed first; the host writes the step's layer from it. */
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
#define WALK2_MAGIC "VMRTWLK2"
#define WALK_REC 32u                /* a record's fixed header; its path follows */
#define WALK_DEPTH_MAX 512u         /* components of a path */
#define WALK_PATH_MAX 4096u         /* bytes of a path */
#define WALK_ENTRIES_MAX 500000u
#define WALK2_REC 44u               /* VMRTWLK2's header */
#define WALK_XATTRS_MAX (256u << 10) /* bytes of one entry's xattr block */
#define WALK_XATTR_VALUE_MAX 65536u
#define WALK_LINKS_MAX 4096u        /* hard-linked files remembered; past it: copies */
#define NS 1000000000LL

static char path[WALK_PATH_MAX + 1]; /* the entry's path, relative to the upper dir */
static uint8_t obuf[1 << 16];
static size_t olen;
static uint64_t count;
static int content;                 /* VMRTWLK2 (WALK_CONTENT) */
static uint8_t xbuf[WALK_XATTRS_MAX]; /* the entry's xattr block */
static size_t xlen;
static char xnames[65536];          /* flistxattr's list (XATTR_LIST_MAX) */
static uint8_t dbuf[1 << 16];       /* a file's content, as it is read */
static struct { dev_t dev; ino_t ino; char *path; } links[WALK_LINKS_MAX];
static size_t nlinks;

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
	const uint8_t *b = p;

	while (n > sizeof obuf - olen) { /* a large xattr block or content: in pieces */
		size_t k = sizeof obuf - olen;

		memcpy(obuf + olen, b, k);
		olen += k;
		b += k;
		n -= k;
		flush_out();
	}
	memcpy(obuf + olen, b, n);
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

/* st's type as the stream's letter ('c' and 'b' set *dev) */
static char type_of(const struct stat *st, int *dev)
{
	*dev = 0;
	switch (st->st_mode & S_IFMT) {
	case S_IFDIR: return 'd';
	case S_IFREG: return 'f';
	case S_IFLNK: return 'l';
	case S_IFCHR: *dev = 1; return 'c';
	case S_IFBLK: *dev = 1; return 'b';
	case S_IFIFO: return 'p';
	case S_IFSOCK: return 's';
	default: walk_fail("%.200s has an unknown file type", path);
	}
}

/* One record: u16 path length, u8 type, u8 flags (bit 0: an opaque
 * directory), u32 permission bits, u64 size, i64 mtime ns, u32 rdev major,
 * u32 rdev minor (devices only), then the path.  VMRTWLK2 adds u32 uid,
 * u32 gid, u32 the xattr block's length to the header, and after the path
 * the xattr block (xbuf) and `size` bytes the caller writes (content,
 * link target); its type may be 'h' (a hard link) and flags bit 1 marks a
 * directory with trusted.overlay.redirect. */
static void emit_as(size_t plen, const struct stat *st, char type, int flags, uint64_t size)
{
	uint8_t h[WALK2_REC];
	int dev = 0;

	if (type == 0)
		type = type_of(st, &dev);
	else
		(void)type_of(st, &dev), dev = 0;
	if (++count > WALK_ENTRIES_MAX)
		walk_fail("the writable layer has more than %u entries", WALK_ENTRIES_MAX);
	vmrt_put16(h, (uint16_t)plen);
	h[2] = (uint8_t)type;
	h[3] = (uint8_t)flags;
	vmrt_put32(h + 4, (uint32_t)(st->st_mode & 07777));
	vmrt_put64(h + 8, size);
	vmrt_put64(h + 16, (uint64_t)mtime_ns(st));
	vmrt_put32(h + 24, dev ? major(st->st_rdev) : 0);
	vmrt_put32(h + 28, dev ? minor(st->st_rdev) : 0);
	vmrt_put32(h + 32, (uint32_t)st->st_uid);
	vmrt_put32(h + 36, (uint32_t)st->st_gid);
	vmrt_put32(h + 40, content ? (uint32_t)xlen : 0);
	out(h, content ? WALK2_REC : WALK_REC);
	out(path, plen);
	if (content)
		out(xbuf, xlen);
}

static void emit(size_t plen, const struct stat *st, int opaque)
{
	xlen = 0;
	emit_as(plen, st, 0, opaque ? 1 : 0, (uint64_t)st->st_size);
}

/* fd's user.* and security.capability xattrs into xbuf: for each, u8 name
 * length, u32 value length, the name, the value. */
static void read_xattrs(int fd)
{
	ssize_t n = flistxattr(fd, xnames, sizeof xnames);

	xlen = 0;
	if (n < 0) {
		if (errno == ENOTSUP || errno == EOPNOTSUPP)
			return;
		walk_fail("cannot list the xattrs of /%.200s: %s", path, strerror(errno));
	}
	for (ssize_t i = 0; i < n;) {
		const char *name = xnames + i;
		size_t nlen = strnlen(name, (size_t)(n - i));
		ssize_t v;

		i += (ssize_t)nlen + 1;
		if (nlen == 0 || nlen > 255 || (strncmp(name, "user.", 5) && strcmp(name, "security.capability")))
			continue;
		if (xlen + 5 + nlen + WALK_XATTR_VALUE_MAX > sizeof xbuf)
			walk_fail("/%.200s has more than %u bytes of xattrs", path, WALK_XATTRS_MAX - WALK_XATTR_VALUE_MAX);
		v = fgetxattr(fd, name, xbuf + xlen + 5 + nlen, WALK_XATTR_VALUE_MAX);
		if (v < 0) {
			if (errno == ENODATA)
				continue; /* removed meanwhile */
			walk_fail("cannot read the xattr %s of /%.200s: %s", name, path, strerror(errno));
		}
		xbuf[xlen] = (uint8_t)nlen;
		vmrt_put32(xbuf + xlen + 1, (uint32_t)v);
		memcpy(xbuf + xlen + 5, name, nlen);
		xlen += 5 + nlen + (size_t)v;
	}
}

/* VMRTWLK2: the regular file `name` in dfd, its content after its record
 * (exactly st_size bytes: a file that shrinks meanwhile fails the walk); a
 * second name of a hard-linked file is an 'h' record naming the first. */
static void emit_file(int dfd, const char *name, size_t plen)
{
	struct stat st;
	int fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
	uint64_t left;

	if (fd < 0) {
		if (errno == ENOENT || errno == ELOOP || errno == ENXIO)
			return; /* removed or replaced meanwhile */
		walk_fail("cannot open /%.200s: %s", path, strerror(errno));
	}
	if (fstat(fd, &st) < 0)
		walk_fail("cannot stat /%.200s: %s", path, strerror(errno));
	if (!S_ISREG(st.st_mode)) {
		close(fd);
		return; /* replaced meanwhile */
	}
	if (st.st_nlink > 1) {
		for (size_t k = 0; k < nlinks; k++) {
			if (links[k].dev == st.st_dev && links[k].ino == st.st_ino) {
				size_t tlen = strlen(links[k].path);

				xlen = 0;
				emit_as(plen, &st, 'h', 0, tlen);
				out(links[k].path, tlen);
				close(fd);
				return;
			}
		}
		if (nlinks < WALK_LINKS_MAX && (links[nlinks].path = strdup(path)) != NULL) {
			links[nlinks].dev = st.st_dev;
			links[nlinks].ino = st.st_ino;
			nlinks++;
		}
	}
	read_xattrs(fd);
	emit_as(plen, &st, 'f', 0, (uint64_t)st.st_size);
	for (left = (uint64_t)st.st_size; left > 0;) {
		ssize_t r = read(fd, dbuf, left < sizeof dbuf ? (size_t)left : sizeof dbuf);

		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			walk_fail("cannot read /%.200s: %s", path, strerror(errno));
		if (r == 0)
			walk_fail("/%.200s shrank while it was read", path);
		out(dbuf, (size_t)r);
		left -= (uint64_t)r;
	}
	close(fd);
}

/* VMRTWLK2: the symbolic link `name` in dfd, its target after its record */
static void emit_link(int dfd, const char *name, size_t plen, const struct stat *st)
{
	char target[WALK_PATH_MAX + 1];
	ssize_t n = readlinkat(dfd, name, target, sizeof target);

	if (n < 0) {
		if (errno == ENOENT || errno == EINVAL)
			return; /* removed or replaced meanwhile */
		walk_fail("cannot read the link /%.200s: %s", path, strerror(errno));
	}
	if ((size_t)n > WALK_PATH_MAX)
		walk_fail("the link /%.200s has a target longer than %u bytes", path, WALK_PATH_MAX);
	xlen = 0;
	emit_as(plen, st, 'l', 0, (uint64_t)n);
	out(target, (size_t)n);
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
			if (content && S_ISREG(st.st_mode)) {
				emit_file(dfd, name, len);
				continue;
			}
			if (content && S_ISLNK(st.st_mode)) {
				emit_link(dfd, name, len, &st);
				continue;
			}
			if (!S_ISDIR(st.st_mode)) {
				if (content) {
					xlen = 0;
					emit_as(len, &st, 0, 0, 0);
				} else {
					emit(len, &st, 0);
				}
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
			if (content) {
				int flags = fgetxattr(sub, "trusted.overlay.opaque", v, sizeof v) == 1 && v[0] == 'y';

				if (fgetxattr(sub, "trusted.overlay.redirect", NULL, 0) >= 0)
					flags |= 2;
				read_xattrs(sub);
				emit_as(len, &st, 0, flags, 0);
			} else {
				emit(len, &st, fgetxattr(sub, "trusted.overlay.opaque", v, sizeof v) == 1 && v[0] == 'y');
			}
			walk_dir(sub, len, depth + 1);
			close(sub);
		}
	}
}

void walk_upper(int with_content)
{
	uint8_t end[WALK2_REC];
	int root = open(RWDIR "/upper", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

	if (root < 0)
		walk_fail("cannot open the writable layer: %s", strerror(errno));
	content = with_content;
	out(content ? WALK2_MAGIC : WALK_MAGIC, sizeof WALK_MAGIC - 1);
	walk_dir(root, 0, 0);
	close(root);
	memset(end, 0, sizeof end); /* path length 0: the end, its size the count */
	vmrt_put64(end + 8, count);
	out(end, content ? WALK2_REC : WALK_REC);
	flush_out();
	_exit(0);
}

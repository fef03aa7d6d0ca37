/* The container's filesystem (agent.h): the image over virtio-fs (or 9p)
 * under an overlayfs upper layer (on the container's disk, or a tmpfs), its
 * /sys, /dev, /dev/pts and /dev/shm, and the volumes, at targets resolved
 * inside the container root. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <linux/openat2.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>

#define SHARE "/run/vmrt/share" /* the virtio-fs share: rootfs/ and volumes/ */
#define LOWER SHARE "/rootfs"
#define DISK_WAIT_MS 5000 /* a swapped-in disk's new capacity reaches the guest by an interrupt */

int mkdir_p(const char *path, mode_t mode)
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

int is_dir(const char *path)
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

/* The writable layer's disk (UPPER_DISK): an ext4 file system the host made
 * in a sparse file of the container's, kept across its restarts.  A VM from
 * the pool or a snapshot booted with an empty placeholder there; the host
 * swapped in the container's file and resized the device, which the guest
 * learns by a config interrupt: wait until the kernel reports the capacity
 * RUN gives, then drop whatever the page cache holds of the device from
 * before (BLKFLSBUF), and mount it. */
static void mount_disk(void)
{
	char dev[8 + VMRT_DISK_NAME_MAX];
	uint64_t size = 0;
	int64_t deadline = now_ms() + DISK_WAIT_MS;
	int fd = -1;

	snprintf(dev, sizeof dev, "/dev/%s", run.disk_dev);
	for (;;) {
		if (fd < 0)
			fd = open(dev, O_RDONLY | O_CLOEXEC);
		if (fd >= 0 && ioctl(fd, BLKGETSIZE64, &size) == 0 && size == run.disk_size)
			break;
		if (now_ms() > deadline) {
			if (fd < 0)
				fatal(125, "the writable layer's disk %s: %s", dev, strerror(errno));
			fatal(125, "the writable layer's disk %s has %llu bytes, not %llu", dev,
			      (unsigned long long)size, (unsigned long long)run.disk_size);
		}
		usleep(2000);
	}
	if (ioctl(fd, BLKFLSBUF, 0) < 0)
		fatal(125, "cannot flush %s: %s", dev, strerror(errno));
	close(fd);
	/* no_prefetch_block_bitmaps: no background read of every group's bitmap,
	 * which competes with the container's start for the vCPU under TCG */
	must_mount(dev, RWDIR, "ext4", MS_NOSUID | MS_NODEV,
		   "discard,noinit_itable,no_prefetch_block_bitmaps");
}

/* Before EXIT: what the container wrote to its disk is on the host's file
 * (the host ends the VM as soon as it has EXIT, and a guest's page cache dies
 * with it; a process container's writes are in the host's page cache).  Not
 * for a disk the host discards at exit (DISK_SCRATCH: `run --rm`). */
void sync_upper(void)
{
	int fd;

	if (!run.disk_size || run.disk_scratch || (fd = open(RWDIR, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0)
		return;
	if (syncfs(fd) < 0)
		con("syncing the writable layer: %s", strerror(errno));
	close(fd);
}

/* A directory of the writable layer: made, or (a restarted container's disk)
 * already there, but never a symlink or another file the disk's last user put
 * in its place. */
static void rw_subdir(const char *path)
{
	struct stat st;

	if (mkdir(path, 0755) < 0 && errno != EEXIST)
		fatal(125, "cannot create %s: %s", path, strerror(errno));
	if (lstat(path, &st) < 0 || !S_ISDIR(st.st_mode))
		fatal(125, "the writable layer's %s is not a directory", path);
}

/* The image (read-only over virtio-fs) under the writable layer: the
 * container's disk (UPPER_DISK), else a tmpfs.  A read-only root gets the
 * same overlay, remounted read-only by the child once mount points and the
 * working directory exist (as runc does). */
void setup_rootfs(void)
{
	char opts[512];

	/* a VM restored from a snapshot: its share is virtio-9p; cached loosely, unless files
	 * there change while it runs (SHARE_FRESH: the names of a user network, rewritten in
	 * place by the host): then every read() reaches the host and only mmaps are cached */
	if (run.share_9p)
		must_mount(run.rootfs, SHARE, "9p", MS_NOSUID | MS_NODEV,
			   run.share_fresh ? "trans=virtio,version=9p2000.L,cache=mmap,msize=512000"
					   : "trans=virtio,version=9p2000.L,cache=loose,msize=512000");
	else
		must_mount(run.rootfs, SHARE, "virtiofs", 0, NULL);
	if (!is_dir(LOWER))
		fatal(125, "the share has no rootfs directory");
	if (run.disk_size)
		mount_disk();
	else
		must_mount("tmpfs", RWDIR, "tmpfs", 0, "mode=0755");
	rw_subdir(RWDIR "/upper");
	rw_subdir(RWDIR "/work");
	/* xino=on: the image (virtio-fs or 9p) and the writable layer are two file
	 * systems; with the layer's id in the high inode bits, stat's st_ino and
	 * readdir's d_ino agree for every entry, as on a host's same-fs overlay
	 * (issue 16: tools match files by inode) */
	snprintf(opts, sizeof opts, "lowerdir=%s,upperdir=%s/upper,workdir=%s/work,xino=on", LOWER,
		 RWDIR, RWDIR);
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
void setup_container_mounts(void)
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

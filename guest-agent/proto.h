/* vmrt agent protocol, version 3 (docs/agent-protocol.md): pure parsers.
 *
 * Nothing in proto.c does I/O, touches globals or allocates: every function
 * works on the buffers its caller passes and never reads or writes outside
 * them, so a fuzzer can drive it (fuzz/fuzz_proto.c). */
#ifndef VMRT_PROTO_H
#define VMRT_PROTO_H

#include <stddef.h>
#include <stdint.h>

#define VMRT_MAGIC         0x7652u
#define VMRT_PROTO_VERSION 3u
#define VMRT_HDR_LEN       8u
#define VMRT_MAX_PAYLOAD   65536u
#define VMRT_FRAME_MAX     (VMRT_HDR_LEN + VMRT_MAX_PAYLOAD)

enum vmrt_msg {
	/* agent -> host */
	VMRT_HELLO = 0x01,
	VMRT_STARTED = 0x02,
	VMRT_STDOUT = 0x03,
	VMRT_STDERR = 0x04,
	VMRT_EXIT = 0x05,
	VMRT_ERROR = 0x06,
	VMRT_PONG = 0x07, /* v3: answers PING, echoing its u64 cookie */
	/* host -> agent */
	VMRT_RUN = 0x41,
	VMRT_STDIN = 0x42,
	VMRT_STDIN_CLOSE = 0x43,
	VMRT_SIGNAL = 0x44,
	VMRT_RESIZE = 0x45,
	VMRT_SHUTDOWN = 0x46,
	VMRT_EXEC = 0x47, /* v2: on an exec port, RUN records for an extra process */
	VMRT_PING = 0x48, /* v3: u64 cookie; the agent answers PONG (liveness) */
};

/* Which direction a stream carries: the set of allowed frame types. */
enum vmrt_dir {
	VMRT_TO_AGENT = 0, /* host -> agent: RUN .. PING */
	VMRT_TO_HOST = 1,  /* agent -> host: HELLO .. PONG */
};

enum vmrt_tag {
	VMRT_TAG_ARG = 1,
	VMRT_TAG_ENV = 2,
	VMRT_TAG_CWD = 3,
	VMRT_TAG_HOSTNAME = 4,
	VMRT_TAG_UID = 5,
	VMRT_TAG_GID = 6,
	VMRT_TAG_GROUPS = 7,
	VMRT_TAG_TTY = 8,
	VMRT_TAG_STDIN = 9,
	VMRT_TAG_TIME = 10,
	VMRT_TAG_ROOTFS = 11,
	VMRT_TAG_READONLY = 12,
	VMRT_TAG_CAPS = 13,
	VMRT_TAG_NO_NEW_PRIVS = 14,
	VMRT_TAG_MOUNT = 15,        /* string: absolute target; starts a mount */
	VMRT_TAG_MOUNT_SOURCE = 16, /* string: path under the share (bind) */
	VMRT_TAG_MOUNT_FLAGS = 17,  /* u32: VMRT_MNT_* */
	VMRT_TAG_MOUNT_DATA = 18,   /* string: fs options (tmpfs size=, mode=) */
	VMRT_TAG_MEMORY_MAX = 19,   /* u64: container memory limit, bytes */
	VMRT_TAG_PIDS_MAX = 20,     /* u64: container pids limit */
	VMRT_TAG_DETACH = 21,       /* empty: EXEC only, do not tie the process to the port */
	VMRT_TAG_SHARE_9P = 22,     /* empty: the ROOTFS tag names a virtio-9p share, not virtio-fs */
	VMRT_TAG_SEED = 23,         /* 16..256 bytes of host randomness: reseed the guest's RNG */
	VMRT_TAG_NET = 24,          /* 18 bytes: eth0's IPv4 address, prefix, gateway, MAC, MTU */
	VMRT_TAG_UPPER_DISK = 25,   /* u64 capacity, then a /dev name: the writable layer's block device */
	VMRT_TAG_NET6 = 26,         /* 33 bytes: eth0's IPv6 address, prefix, gateway (needs NET) */
	VMRT_TAG_DISK_SCRATCH = 27, /* empty, with UPPER_DISK: the host discards the disk at exit (no sync) */
	VMRT_TAG_SHARE_FRESH = 28,  /* empty, with SHARE_9P: files there change (names): 9p cache=mmap */
	/* 29 left for other records */
	VMRT_TAG_SECCOMP = 30,      /* struct sock_filter[] (8..32768 bytes): installed before execve */
	VMRT_TAG_MASKED = 31,       /* string: absolute path hidden from the container (OCI maskedPaths) */
	VMRT_TAG_RO_PATH = 32,      /* string: absolute path made read-only (OCI readonlyPaths) */
	VMRT_TAG_WALK_UPPER = 33,   /* empty: the process walks the writable layer (walk.c) instead of exec'ing ARG */
	VMRT_TAG_RLIMIT = 34,       /* u32 resource, u64 soft, u64 hard: an OCI process.rlimits entry */
	VMRT_TAG_WALK_CONTENT = 35, /* empty, with WALK_UPPER: the walk carries contents too (VMRTWLK2, a build step's layer) */
	VMRT_TAG_WALK_AFTER = 36,   /* empty, RUN: after the process exits 0, EXIT, the VMRTWLK2 walk as STDOUT, a second EXIT */
};

enum vmrt_mount_flags {
	VMRT_MNT_RO = 1u << 0,
	VMRT_MNT_NOSUID = 1u << 1,
	VMRT_MNT_NODEV = 1u << 2,
	VMRT_MNT_NOEXEC = 1u << 3,
	VMRT_MNT_TMPFS = 1u << 8, /* else a bind of source */
	VMRT_MNT_ALL = 0x10Fu,
};

#define VMRT_MAX_ARGS   4096u
#define VMRT_MAX_ENV    4096u
#define VMRT_MAX_GROUPS 1024u
#define VMRT_MAX_STRING 32768u
#define VMRT_MAX_MOUNTS 64u
#define VMRT_SEED_MIN   16u
#define VMRT_SEED_MAX   256u
#define VMRT_NET_LEN    18u /* u32 addr, u8 prefix, u32 gateway, 6 MAC, u16 MTU, u8 flags */
#define VMRT_NET_MTU_MIN 68u /* IPv4's minimum */
#define VMRT_NET6_LEN   33u /* 16 address, u8 prefix, 16 gateway (all zero: none) */
#define VMRT_DISK_NAME_MAX 31u /* UPPER_DISK's device name: 1..31 of [a-z0-9] */
#define VMRT_SECCOMP_MAX (4096u * 8u) /* BPF_MAXINSNS instructions of 8 bytes */
#define VMRT_MAX_PATHS  64u          /* MASKED, and RO_PATH, records each */
#define VMRT_MAX_RLIMITS 16u         /* RLIMIT records (one per resource, RLIMIT_NLIMITS) */

struct vmrt_mount {
	const char *target; /* absolute, resolved inside the container root */
	const char *source; /* bind: relative path under the share, no ".." */
	const char *data;   /* "" if none */
	uint32_t flags;
};

struct vmrt_frame {
	uint8_t type;
	uint32_t len;
	const uint8_t *payload; /* points into the caller's buffer */
};

/* Parse one frame from the start of buf[0..len).
 *
 * Returns the number of bytes the frame occupies (> 0) and fills *out when a
 * whole, valid frame is there; 0 when more bytes are needed (the bytes seen so
 * far are valid: a bad header is reported as soon as its 8 bytes are there);
 * -1 on a protocol error, with a one-line message in err (always
 * NUL-terminated when errlen > 0).  Frames are never longer than
 * VMRT_FRAME_MAX, so a caller's buffer of that size always makes progress.
 * Fixed-size payloads are checked here (SIGNAL, RESIZE: 4 bytes; STDIN_CLOSE,
 * SHUTDOWN: empty; STARTED: 4; EXIT: 12, status <= 255; HELLO >= 20;
 * ERROR >= 4; PING, PONG: 8); RUN and EXEC payloads are decoded by vmrt_run_parse. */
long vmrt_frame_parse(const uint8_t *buf, size_t len, enum vmrt_dir dir,
		      struct vmrt_frame *out, char *err, size_t errlen);

/* Encode a frame header for a payload of len bytes (len <= VMRT_MAX_PAYLOAD). */
void vmrt_frame_header(uint8_t hdr[VMRT_HDR_LEN], uint8_t type, uint32_t len);

/* A decoded RUN or EXEC message.  Strings are NUL-terminated copies in strings[]
 * (the parser needs at most len bytes there for a payload of len bytes). */
struct vmrt_run {
	char *argv[VMRT_MAX_ARGS + 1]; /* NULL-terminated */
	size_t argc;
	char *envp[VMRT_MAX_ENV + 1]; /* NULL-terminated */
	size_t envc;
	const char *cwd;      /* default "/" */
	const char *hostname; /* default "vmrt" */
	const char *rootfs;   /* default "rootfs" */
	uint32_t uid, gid;
	uint32_t groups[VMRT_MAX_GROUPS];
	size_t ngroups;
	int tty; /* TTY record given */
	uint16_t rows, cols;
	int open_stdin; /* STDIN record given */
	int has_time;
	uint64_t time_ns;
	int readonly;
	int has_caps;     /* CAPS record given */
	uint64_t caps;    /* capabilities to keep (bit N = capability N) */
	int no_new_privs; /* NO_NEW_PRIVS record given */
	struct vmrt_mount mounts[VMRT_MAX_MOUNTS];
	size_t nmounts;
	uint64_t memory_max; /* 0: no limit */
	uint64_t pids_max;   /* 0: no limit */
	int detach;          /* DETACH record given (EXEC) */
	int share_9p;        /* SHARE_9P record given */
	size_t seed_len;     /* SEED bytes given (0: none) */
	uint8_t seed[VMRT_SEED_MAX];
	int has_net;         /* NET record given */
	uint32_t net_addr, net_gw; /* network byte order, as in struct sockaddr_in (gw 0: no route) */
	uint8_t net_prefix;  /* 1..32 */
	uint8_t net_mac[6];  /* unicast */
	uint16_t net_mtu;    /* 0: the default; else 68..65535 */
	int has_net6;        /* NET6 record given (only with NET) */
	uint8_t net6_addr[16], net6_gw[16]; /* unicast; gw all zero: no default route */
	uint8_t net6_prefix; /* 1..128 */
	uint64_t disk_size;  /* UPPER_DISK: the device's capacity in bytes (0: no record) */
	char disk_dev[VMRT_DISK_NAME_MAX + 1]; /* ... and its name under /dev, e.g. "vda" */
	int disk_scratch;    /* DISK_SCRATCH record given */
	int share_fresh;     /* SHARE_FRESH record given */
	size_t seccomp_len;  /* bytes of the SECCOMP filter (0: none), a multiple of 8 */
	uint8_t seccomp[VMRT_SECCOMP_MAX];
	const char *masked[VMRT_MAX_PATHS];
	size_t nmasked;
	const char *ro_paths[VMRT_MAX_PATHS];
	size_t nro_paths;
	int walk;            /* WALK_UPPER record given (never with TTY or DETACH) */
	int walk_content;    /* WALK_CONTENT record given (only with WALK_UPPER) */
	int walk_after;      /* WALK_AFTER record given (never with WALK_UPPER or TTY) */
	struct { uint32_t resource; uint64_t soft, hard; } rlimits[VMRT_MAX_RLIMITS];
	size_t nrlimits;
	char strings[VMRT_MAX_PAYLOAD];
};

/* Decode a RUN payload (records: u8 tag, u32 length, value).  Returns 0 on
 * success, -1 with a message in err on a malformed payload: truncated
 * record, string with NUL or invalid UTF-8 or longer than VMRT_MAX_STRING,
 * a fixed-size value of the wrong size, a non-empty flag record, a relative
 * CWD, too many ARG/ENV/GROUPS/MOUNT, no ARG, a MOUNT_* record before any
 * MOUNT, a relative MOUNT target, a bind without a relative, ".."-free
 * source, unknown mount flags, a second NET or one with a prefix outside
 * 1..32, a multicast MAC, an MTU below 68 or non-zero flags, a second NET6,
 * one without NET, or one whose address is ::, ::1 or multicast, whose
 * prefix is outside 1..128 or whose gateway is ::1 or multicast, a second
 * UPPER_DISK or one whose capacity is 0 or not whole 512-byte sectors or
 * whose name is not 1..31 of [a-z0-9], a second
 * SECCOMP or one that is empty, not whole instructions or longer than
 * BPF_MAXINSNS, too many MASKED/RO_PATH or one not absolute or with "..",
 * a non-empty WALK_UPPER or one with TTY or DETACH, a non-empty
 * WALK_CONTENT or one without WALK_UPPER, a non-empty WALK_AFTER or one
 * with WALK_UPPER or TTY, an RLIMIT that is not
 * 20 bytes, names a resource outside 0..15, a second time, or a soft limit
 * above its hard one.
 * Unknown tags are skipped. */
int vmrt_run_parse(const uint8_t *p, size_t len, struct vmrt_run *out,
		   char *err, size_t errlen);

/* Length (2-4) of the valid multi-byte UTF-8 sequence at s[0..n): strict (no
 * overlongs, surrogates or code points past U+10FFFF); 0 if there is none. */
size_t vmrt_utf8_seq(const uint8_t *s, size_t n);

/* Big-endian helpers (pure). */
static inline uint16_t vmrt_get16(const uint8_t *p)
{
	return (uint16_t)((unsigned)p[0] << 8 | p[1]);
}
static inline uint32_t vmrt_get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t vmrt_get64(const uint8_t *p)
{
	return (uint64_t)vmrt_get32(p) << 32 | vmrt_get32(p + 4);
}
static inline void vmrt_put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}
static inline void vmrt_put32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}
static inline void vmrt_put64(uint8_t *p, uint64_t v)
{
	vmrt_put32(p, (uint32_t)(v >> 32));
	vmrt_put32(p + 4, (uint32_t)v);
}

#endif

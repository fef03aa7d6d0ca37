/* vmrt-agent: PID 1 of a vmrt micro-VM.
 *
 * Boots the guest userspace, talks the agent protocol (docs/agent-protocol.md)
 * with the host over the virtio-serial port "org.vmrt.agent.0", sets up the
 * container root (virtio-fs image + overlayfs on its disk), runs the container
 * process in new PID and mount namespaces, relays its stdio and reports its
 * exit, then powers the VM off.  While the container runs, the exec ports
 * "org.vmrt.exec.N" each carry one extra process at a time (EXEC), started in
 * the container's namespaces, root and cgroup.
 *
 * The one header of the agent's files: what crosses them.
 *   boot.c     main(): boot mounts, ports, HELLO, RUN, the container's start;
 *              con(), poweroff()
 *   port.c     frames to and from the virtio-serial ports; fatal()
 *   net.c      lo and eth0 (NET)
 *   mounts.c   the container root, /dev, /sys and the volumes
 *   child.c    a container process: stdio, cgroup, what its child does up to
 *              exec (the main one and each exec process)
 *   session.c  the main loop: the sessions' frames, output, stdin, EXIT
 *   walk.c     WALK_UPPER: a process that lists the writable layer's upper
 *              dir on its stdout instead of exec'ing (`docker diff`)
 * The frame and RUN parsers are proto.c's; clock_ns, now_ms and the console
 * line's format are common/util.c's (shared with the host monitor). */
#ifndef VMRT_AGENT_H
#define VMRT_AGENT_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "proto.h"
#include "util.h"

#define NEXEC 4 /* exec ports org.vmrt.exec.0 .. 3 (the host's EXEC_PORTS) */
#define ROOT "/run/vmrt/root" /* the container root (mounts.c), moved over "/" by the child */
#define RWDIR "/run/vmrt/rw"  /* the writable layer (mounts.c): the overlay's upper/ and work/ */

#define OUT_CHUNK (16 * 1024)
#define STDIN_QCAP (4 * VMRT_FRAME_MAX)
#define WQ_CAP (2 * VMRT_FRAME_MAX) /* frames waiting for the port; output is read below OUT_CHUNK */
#define PORT_WAIT_MS 10000   /* how long the host may stay unconnected before RUN */

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

/* ---------------------------------------------------------------- boot.c */

extern int host_seen;         /* RUN received: from now on HUP means the host is gone */
extern pid_t child;           /* the container process; -1 if none */
extern struct vmrt_run run;   /* the container's RUN */

void con(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void kill_proc(pid_t pid);
void poweroff(void) __attribute__((noreturn));

/* ---------------------------------------------------------------- port.c */

extern uint8_t pbuf[VMRT_MAX_PAYLOAD]; /* the payload of the frame being handled */

void host_gone(void) __attribute__((noreturn));
short port_wait(short events, int timeout_ms);
void sess_flush(struct session *x);
void main_flush(void);
void sess_send(struct session *x, uint8_t type, const void *payload, size_t len);
void send_frame(uint8_t type, const void *payload, size_t len);
void sess_error(struct session *x, uint32_t code, const char *msg);
void send_error(uint32_t code, const char *msg);
size_t port_read(struct session *x);
void protocol_error(const char *what) __attribute__((noreturn));
int next_frame(struct vmrt_frame *f);
void fatal(int code, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));

/* ---------------------------------------------------------------- net.c */

void setup_network(void);

/* ---------------------------------------------------------------- mounts.c */

int mkdir_p(const char *path, mode_t mode);
int is_dir(const char *path);
void setup_rootfs(void);
void sync_upper(void); /* before the container's EXIT */
void setup_container_mounts(void);

/* ---------------------------------------------------------------- child.c */

extern int errpipe_w; /* the forked child's end of its close-on-exec error pipe */

void stdio_close_child(struct stdio *s);
void stdio_close(struct stdio *s);
int stdio_open(struct stdio *s, const struct vmrt_run *r, int devnull, char *pts, size_t ptslen,
	       char *err, size_t errlen);
int write_file(const char *path, const char *text); /* whole text, or -1 */
void setup_cgroup(void);
uint64_t oom_kills(void);
void child_main(const struct stdio *s) __attribute__((noreturn));
void exec_child_main(const struct stdio *s, const struct vmrt_run *r, int mntns) __attribute__((noreturn));
int read_errpipe(int fd, uint32_t *code, char *msg, size_t msglen);
pid_t walk_spawn(struct stdio *s); /* WALK_AFTER's walk, its stdio pipes in s; -1 on failure */

/* ---------------------------------------------------------------- walk.c */

void walk_upper(int content) __attribute__((noreturn)); /* in the child, its stdout the stream (WALK_CONTENT: VMRTWLK2) */

/* ---------------------------------------------------------------- session.c */

extern struct session sess[1 + NEXEC];
#define MAIN (&sess[0])
#define port_fd (sess[0].fd)
extern int sfd;        /* signalfd for SIGCHLD */
extern int self_pidns; /* the agent's own PID namespace */

void sessions_init(void);
void supervise(void);
void linger(int ms);

#endif

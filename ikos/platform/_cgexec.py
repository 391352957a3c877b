"""The cgroup trampoline: a tiny compiled program that joins a cgroup, then execs.

An executable in ``kill_mode = "control-group"`` must be in its cgroup before
it runs a single instruction of its own, or a quick fork could escape the
stop. ``posix_spawn`` (clone with ``CLONE_VM | CLONE_VFORK``, then exec: the
fast start) cannot join a cgroup, and Python's fork of the manager or of the
fork server costs milliseconds. So the manager posix_spawns this trampoline
instead: it starts the daemon with ``clone3(CLONE_INTO_CGROUP | CLONE_VFORK)``
straight into its cgroup v2 directory (after joining any cgroup v1 one by
writing its own PID to ``cgroup.procs``, which the child inherits), the
child calls setsid and execs, and the trampoline writes the daemon's PID on
the error pipe and exits, so the daemon is re-parented to ikosd (a child
subreaper). A failure is one ``"<field>: <reason>"`` line on that pipe, as
in :func:`~ikos.platform._spawn.exec_in_child`. Where clone3 or
CLONE_INTO_CGROUP is missing (Linux < 5.7), the trampoline joins the v2
cgroup by writing too and execs the daemon itself.

Measured on the 2-core test machine (an ikosd-sized Python process spawning
a 129-byte static program): posix_spawn alone 0.09 ms; a trampoline writing
``cgroup.procs`` then exec'ing, 0.5-0.7 ms in a tight loop, but 7-25 ms
(median 15) when starts are a fraction of a second apart, as restarts are:
moving a process between cgroups takes the kernel's global threadgroup
lock for writing, which waits for an RCU grace period once the lock has
gone quiet. ``clone3(CLONE_INTO_CGROUP)`` takes that lock only for reading:
1-6 ms on the same spaced pattern, the same as the trampoline with no
cgroup at all on that (loaded) machine. A ``sh -c 'echo $$ >
cgroup.procs; exec "$@"'`` trampoline: no better than the write, with no
clean error report; a fork of the Python process 2.4 ms before its cgroup
write, the fork server's double fork more. Rejected: ``clone3`` from Python
(ctypes cannot give a CLONE_VM child its own stack, and without CLONE_VM it
is a fork of the big interpreter again).

The same program also runs as a spawn server (``ikos-cgexec serve``,
:class:`SpawnServer`), kept running by ikosd and used first: a start is a
message on a socket pair, no program to exec. A persistent spawner was
rejected at first as one more process and a protocol for a small saving;
measured again (issue 12, Python parent, load 10, medians of 300 starts into
a cgroup v2 directory): posix_spawn with no cgroup 0.11 ms, the one-shot
trampoline 1.37 ms dynamically linked and 1.03 ms statically, the server
0.22 ms; with starts 10 ms apart 0.38 ms against 3.4. The trampoline's two
execs, its dynamic loading and its exit were most of a start in the default
mode, and a wave of 500 starts is pipelined through the server. The server
clones with ``CLONE_PARENT``, so the daemon is ikosd's child as before. The
one-shot trampoline stays for what the server does not do (cgroup v1
directories, a request over its buffer), when it died or hangs, and with
``IKOS_SPAWN_SERVER=off``. Linking it statically was tried: it saves the
one-shot trampoline 0.2-0.3 ms a start, but the long-lived server then
holds its whole text privately (USS 530-710 KiB against 112 KiB
dynamically linked, its C library shared), and with the server the
trampoline is only the fallback: dynamically linked, as before.

The program is compiled from :data:`SOURCE` with the machine's C compiler
(``python -m ikos.platform._cgexec`` does it at install time; ikosd does it
in a worker thread at start when it is missing) into a cache directory
owned by the user, named after the hash of the source. Where there is no
compiler, or the cache is not safe to execute from, :func:`helper_path` is
None and the manager falls back to the pure-Python path (the fork server).
``IKOS_SPAWN_HELPER=off`` forces that fallback.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ikos.platform._digest import sha256
from ikos.platform._memfd import RECV_FLAGS, close_all, fds_of
from ikos.platform._process import (
    add_reap_guard,
    disown,
    hold_reaping,
    own,
    release_reaping,
    remove_reap_guard,
)

log = logging.getLogger("ikos.cgexec")

#: Usage: ``ikos-cgexec ERRFD N CGROUP_DIR_1 .. CGROUP_DIR_N EXECUTABLE ARGV0 ARGS...``.
#: The daemon starts in a cgroup v2 directory through ``clone3(CLONE_INTO_CGROUP |
#: CLONE_VFORK)``, and joins the others (v1) by writing ``cgroup.procs`` first; it
#: calls setsid, then execs. The trampoline reports ``pid N`` on ERRFD (the daemon's:
#: its own when there was no clone) and exits; a failure is a ``field: reason`` line.
SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>

#define CGROUP2_MAGIC 0x63677270
#define INTO_CGROUP 0x200000000ULL
#define VFORK 0x00004000ULL

extern char **environ;

struct clone_args_v2 {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
    uint64_t set_tid, set_tid_size, cgroup;
};

static void fail(int fd, const char *field, const char *what, int err)
{
    char buf[4200];
    int n = snprintf(buf, sizeof buf, "%s: %s: %s\n", field, strerror(err), what);
    if (n > (int)sizeof buf - 1)
        n = (int)sizeof buf - 1;
    if (n > 0 && write(fd, buf, (size_t)n) < 0)
        _exit(127);
    _exit(127);
}

static void report_pid(int fd, long pid)
{
    char buf[32];
    int n = snprintf(buf, sizeof buf, "pid %ld\n", pid);
    if (write(fd, buf, (size_t)n) != n)
        _exit(127);
}

static void join(int errfd, const char *dir)
{
    char path[4200], pid[24];
    int len = snprintf(pid, sizeof pid, "%ld", (long)getpid());
    snprintf(path, sizeof path, "%s/cgroup.procs", dir);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, pid, (size_t)len) != len)
        fail(errfd, "cgroup", path, errno);
    close(fd);
}

static void become(int errfd, char **argv)
{
    if (setsid() < 0)
        fail(errfd, "session", "setsid", errno);
    execve(argv[0], argv + 1, environ);
    fail(errfd, "executable", argv[0], errno);
}

/* The spawn server: one request per SOCK_SEQPACKET message on fd SOCK, "ARGC\0EXE\0ARGV..\0ENV..\0"
   with SCM_RIGHTS [cgroup v2 dir, stdin, stdout, stderr]; clone3(INTO_CGROUP | VFORK | PARENT),
   so the daemon is the manager's child; reply "pid N" (after the child's own "field: reason"
   message if its exec failed), or "request: ..." alone. Exits at EOF: the manager is gone.

   An armed restart, as runsv's: "arm\0ID\0FLAGS\0ARGC\0NUNIQUE\0EXE\0ARGV..\0UNIQUE..\0SHARED..\0"
   with [pidfd of the running daemon, cgroup v2 dir, stdin, stdout unless FLAGS & 1, stderr
   unless FLAGS & 2] (a flagged stream gets a new pipe, its read end sent back). When the pidfd
   says the daemon ended, and its cgroup is empty, the server starts the same command at once
   and says "auto ID pid N" with the pipes' read ends (or "auto ID field: reason" if nothing
   started); else, or at "disarm\0ID\0", "skip ID". Each arm ends in exactly one
   "auto" or "skip". Every message waiting on the socket is read before a pidfd is looked at:
   a disarm sent before the manager signals the daemon is always seen before its end. The
   SHARED environment (the same for most daemons of an instance) is kept once. */
#define PARENT 0x00008000ULL
#define MAX_REQUEST (256 * 1024)
#define NFDS 4
#define MAX_FDS 8
#define SOCK_TOKEN UINT64_MAX

static char request[MAX_REQUEST + 1];
static char *ptrs[MAX_REQUEST / 2 + 4];
static char *cargv[MAX_REQUEST / 2 + 4];
static struct rlimit nofile;

struct block { struct block *next; uint64_t hash; size_t len, refs, count; char data[]; };
struct arm {
    long id; /* 0: a free slot */
    uint32_t gen;
    int pidfd, cgfd, in, out, err, argc, nunique; /* out, err: -1 for a pipe */
    char *head; /* EXE\0ARGV..\0UNIQUE..\0 */
    struct block *shared;
};
static struct block *blocks;
static struct arm *arms;
static size_t narms;
static int ep = -1;

static void say(int sock, const char *text)
{
    if (send(sock, text, strlen(text), MSG_NOSIGNAL) < 0)
        _exit(0); /* the manager is gone */
}

static void say_fds(int sock, const char *text, const int *fds, int n)
{
    union { char buf[CMSG_SPACE(sizeof(int) * 2)]; struct cmsghdr align; } ctl;
    struct iovec iov = { (void *)text, strlen(text) };
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    if (n > 0) {
        mh.msg_control = ctl.buf;
        mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)n);
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)n);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)n);
    }
    if (sendmsg(sock, &mh, MSG_NOSIGNAL) < 0)
        _exit(0);
}

static void child_fail(int sock, const char *field, const char *what, int err)
{
    char buf[4200];
    snprintf(buf, sizeof buf, "%s: %s: %s", field, strerror(err), what);
    send(sock, buf, strlen(buf), MSG_NOSIGNAL);
    _exit(127);
}

/* In the clone3 child (the server's memory, until the exec): become the daemon. */
static void start(int sock, const int *stdio, const char *exe, char **argv, char **env)
{
    for (int i = 0; i < 3; i++)
        if (dup2(stdio[i], i) < 0)
            child_fail(sock, "stdio", "dup2", errno);
    setrlimit(RLIMIT_NOFILE, &nofile); /* the manager's, not the server's raised one */
    if (setsid() < 0)
        child_fail(sock, "session", "setsid", errno);
    execve(exe, argv, env);
    child_fail(sock, "executable", exe, errno);
}

static long clone_into(int cgfd)
{
    struct clone_args_v2 args;
    memset(&args, 0, sizeof args);
    args.flags = INTO_CGROUP | VFORK | PARENT;
    args.cgroup = (uint64_t)cgfd;
    return syscall(SYS_clone3, &args, sizeof args);
}

static void closing(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
}

static void spawn_request(int sock, long n, int *fds, int nfds, int truncated)
{
    int count = 0;
    for (char *p = request; p < request + n; p += strlen(p) + 1)
        ptrs[count++] = p;
    long argc = count > 0 ? strtol(ptrs[0], NULL, 10) : -1;
    if (nfds != NFDS || truncated || n == 0 || request[n - 1] != 0 || argc < 1
        || argc > count - 2) {
        closing(fds, nfds);
        say(sock, "request: malformed spawn request");
        return;
    }
    memcpy(cargv, ptrs + 2, (size_t)argc * sizeof *cargv);
    cargv[argc] = NULL;
    ptrs[count] = NULL;
    long pid = clone_into(fds[0]);
    if (pid == 0)
        start(sock, fds + 1, ptrs[1], cargv, ptrs + 2 + argc);
    int err = errno;
    closing(fds, nfds);
    char out[4200];
    if (pid < 0)
        snprintf(out, sizeof out, "cgroup: %s: clone3 into the cgroup", strerror(err));
    else
        snprintf(out, sizeof out, "pid %ld", pid);
    say(sock, out);
}

static uint64_t fnv(const char *p, size_t n)
{
    uint64_t h = 14695981039346656037ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)p[i]) * 1099511628211ULL;
    return h;
}

static struct block *share(const char *p, size_t len, size_t count)
{
    uint64_t h = fnv(p, len);
    for (struct block *b = blocks; b; b = b->next)
        if (b->hash == h && b->len == len && memcmp(b->data, p, len) == 0) {
            b->refs++;
            return b;
        }
    struct block *b = malloc(sizeof *b + len);
    if (!b)
        return NULL;
    b->hash = h;
    b->len = len;
    b->refs = 1;
    b->count = count;
    memcpy(b->data, p, len);
    b->next = blocks;
    blocks = b;
    return b;
}

static void unshare_block(struct block *b)
{
    if (--b->refs)
        return;
    for (struct block **at = &blocks; *at; at = &(*at)->next)
        if (*at == b) {
            *at = b->next;
            break;
        }
    free(b);
}

static void drop(struct arm *a)
{
    /* out of the epoll set first: a closed descriptor leaves it only with its file's last
       reference, and a child mid-exec still holds a copy (epoll_wait would spin on it) */
    epoll_ctl(ep, EPOLL_CTL_DEL, a->pidfd, NULL);
    int fds[5] = { a->pidfd, a->cgfd, a->in, a->out, a->err };
    closing(fds, 5);
    free(a->head);
    unshare_block(a->shared);
    a->id = 0;
    a->gen++;
}

static void end_arm(int sock, struct arm *a, const char *word)
{
    char msg[64];
    snprintf(msg, sizeof msg, "%s %ld", word, a->id);
    drop(a);
    say(sock, msg);
}

static struct arm *find(long id)
{
    for (size_t i = 0; i < narms; i++)
        if (arms[i].id == id)
            return &arms[i];
    return NULL;
}

static void arm_request(int sock, long n, int *fds, int nfds, int truncated)
{
    int count = 0;
    for (char *p = request; p < request + n && count < 6; p += strlen(p) + 1)
        ptrs[count++] = p;
    long id = count > 1 ? strtol(ptrs[1], NULL, 10) : 0;
    long flags = count > 2 ? strtol(ptrs[2], NULL, 10) : -1;
    long argc = count > 3 ? strtol(ptrs[3], NULL, 10) : -1;
    long nunique = count > 4 ? strtol(ptrs[4], NULL, 10) : -1;
    int want = 3 + !(flags & 1) + !(flags & 2);
    /* the head: EXE, ARGV, UNIQUE; the rest is the shared environment */
    char *head = count == 6 ? ptrs[5] : NULL, *end = head;
    if (argc < 1 || argc > MAX_REQUEST / 2 || nunique < 0 || nunique > MAX_REQUEST / 2)
        head = NULL; /* more strings than the message can hold (nor overflow the count) */
    for (long i = 0; head && i < 1 + argc + nunique; i++) {
        if (end >= request + n) {
            head = NULL;
            break;
        }
        end += strlen(end) + 1;
    }
    size_t slot = narms;
    for (size_t i = 0; i < narms; i++)
        if (arms[i].id == 0) {
            slot = i;
            break;
        }
    if (id <= 0 || find(id) || flags < 0 || flags > 3 || argc < 1 || nunique < 0 || !head
        || nfds != want || truncated || request[n - 1] != 0) {
        closing(fds, nfds);
        if (id > 0 && !find(id)) {
            char msg[64];
            snprintf(msg, sizeof msg, "skip %ld", id);
            say(sock, msg);
        }
        return;
    }
    if (slot == narms) {
        struct arm *more = realloc(arms, (narms + 1) * sizeof *arms);
        if (!more)
            goto refuse;
        arms = more;
        memset(&arms[narms], 0, sizeof *arms);
        narms++;
    }
    struct arm *a = &arms[slot];
    size_t shared_count = 0;
    for (char *p = end; p < request + n; p += strlen(p) + 1)
        shared_count++;
    a->head = malloc((size_t)(end - head));
    a->shared = a->head ? share(end, (size_t)(request + n - end), shared_count) : NULL;
    if (!a->shared) {
        free(a->head);
        goto refuse;
    }
    memcpy(a->head, head, (size_t)(end - head));
    a->id = id;
    a->argc = (int)argc;
    a->nunique = (int)nunique;
    a->pidfd = fds[0];
    a->cgfd = fds[1];
    a->in = fds[2];
    a->out = flags & 1 ? -1 : fds[3];
    a->err = flags & 2 ? -1 : fds[3 + !(flags & 1)];
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = ((uint64_t)a->gen << 32) | slot };
    if (epoll_ctl(ep, EPOLL_CTL_ADD, a->pidfd, &ev) < 0) {
        end_arm(sock, a, "skip");
        return;
    }
    return;
refuse:
    closing(fds, nfds);
    char msg[64];
    snprintf(msg, sizeof msg, "skip %ld", id);
    say(sock, msg);
}

/* The armed daemon ended: start it again now, if its cgroup is empty. */
static void fire(int sock, struct arm *a)
{
    int procs = openat(a->cgfd, "cgroup.procs", O_RDONLY | O_CLOEXEC);
    char c;
    ssize_t got = procs < 0 ? 1 : read(procs, &c, 1);
    if (procs >= 0)
        close(procs);
    if (got != 0) { /* what it left is the manager's to end first */
        end_arm(sock, a, "skip");
        return;
    }
    char msg[4300];
    int mine[2] = { -1, -1 }, theirs[2] = { -1, -1 }, nmine = 0;
    int stdio[3] = { a->in, a->out, a->err };
    for (int k = 0; k < 2; k++) {
        if (stdio[1 + k] >= 0)
            continue;
        int p[2];
        if (pipe2(p, O_CLOEXEC) < 0) {
            int err = errno;
            closing(mine, 2);
            closing(theirs, 2);
            snprintf(msg, sizeof msg, "auto %ld stdio: %s: pipe", a->id, strerror(err));
            drop(a);
            say(sock, msg);
            return;
        }
        mine[nmine++] = p[0];
        theirs[k] = p[1];
        stdio[1 + k] = p[1];
    }
    char *p = a->head, *exe = p;
    p += strlen(p) + 1;
    for (int i = 0; i < a->argc; i++, p += strlen(p) + 1)
        cargv[i] = p;
    cargv[a->argc] = NULL;
    size_t e = 0;
    for (char *q = a->shared->data; q < a->shared->data + a->shared->len; q += strlen(q) + 1)
        ptrs[e++] = q;
    for (int i = 0; i < a->nunique; i++, p += strlen(p) + 1)
        ptrs[e++] = p;
    ptrs[e] = NULL;
    long pid = clone_into(a->cgfd);
    if (pid == 0)
        start(sock, stdio, exe, cargv, ptrs);
    int err = errno;
    closing(theirs, 2);
    if (pid < 0) {
        closing(mine, 2);
        snprintf(msg, sizeof msg, "auto %ld cgroup: %s: clone3 into the cgroup", a->id,
                 strerror(err));
        nmine = 0;
    } else
        snprintf(msg, sizeof msg, "auto %ld pid %ld", a->id, pid);
    drop(a);
    say_fds(sock, msg, mine, nmine);
    closing(mine, nmine);
}

/* Read every message waiting; 0 at EOF (the manager is gone). */
static int drain(int sock)
{
    for (;;) {
        int fds[MAX_FDS], nfds = 0;
        union { char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)]; struct cmsghdr align; } ctl;
        struct iovec iov = { request, MAX_REQUEST };
        struct msghdr mh;
        memset(&mh, 0, sizeof mh);
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        mh.msg_control = ctl.buf;
        mh.msg_controllen = sizeof ctl.buf;
        ssize_t n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n == 0)
            return 0;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN || errno == EWOULDBLOCK;
        }
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            int *got = (int *)CMSG_DATA(c);
            for (int i = 0; i < k; i++) {
                if (nfds < MAX_FDS)
                    fds[nfds++] = got[i];
                else
                    close(got[i]);
            }
        }
        request[n] = 0;
        int truncated = (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0;
        if (strcmp(request, "arm") == 0)
            arm_request(sock, n, fds, nfds, truncated);
        else if (strcmp(request, "disarm") == 0) {
            closing(fds, nfds);
            struct arm *a = n > 7 ? find(strtol(request + 7, NULL, 10)) : NULL;
            if (a && a->id > 0)
                end_arm(sock, a, "skip");
        } else
            spawn_request(sock, n, fds, nfds, truncated);
    }
}

static int serve(int sock)
{
    if (fcntl(sock, F_SETFD, FD_CLOEXEC) < 0)
        return 127;
    /* what the manager inherited and did not mark close-on-exec stops here */
    syscall(SYS_close_range, sock + 1, ~0U, 0);
    /* room for the armed daemons' descriptors; each daemon gets the manager's limit back */
    getrlimit(RLIMIT_NOFILE, &nofile);
    struct rlimit raised = { nofile.rlim_max, nofile.rlim_max };
    setrlimit(RLIMIT_NOFILE, &raised);
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = SOCK_TOKEN };
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, sock, &ev) < 0)
        return 127;
    for (;;) {
        struct epoll_event got[64];
        int k = epoll_wait(ep, got, 64, -1);
        if (k < 0 && errno != EINTR)
            return 0;
        for (int j = 0; j < k; j++) {
            /* before any end is acted on, every message sent before it */
            if (!drain(sock))
                return 0;
            if (got[j].data.u64 == SOCK_TOKEN)
                continue;
            size_t slot = (size_t)(got[j].data.u64 & 0xffffffffULL);
            uint32_t gen = (uint32_t)(got[j].data.u64 >> 32);
            if (slot < narms && arms[slot].id > 0 && arms[slot].gen == gen)
                fire(sock, &arms[slot]);
        }
    }
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "serve") == 0)
        return serve(3);
    if (argc < 5)
        return 127;
    int errfd = atoi(argv[1]);
    int n = atoi(argv[2]);
    if (n < 0 || argc < 5 + n)
        return 127;
    if (fcntl(errfd, F_SETFD, FD_CLOEXEC) < 0)
        return 127;
    int v2 = -1;
    for (int i = 0; i < n; i++) {
        const char *dir = argv[3 + i];
        struct statfs fs;
        if (v2 < 0 && statfs(dir, &fs) == 0 && fs.f_type == CGROUP2_MAGIC) {
            v2 = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (v2 >= 0)
                continue;
        }
        join(errfd, dir);
    }
    char **target = argv + 3 + n;
    if (v2 >= 0) {
        struct clone_args_v2 args;
        memset(&args, 0, sizeof args);
        args.flags = INTO_CGROUP | VFORK;
        args.exit_signal = SIGCHLD;
        args.cgroup = (uint64_t)v2;
        long pid = syscall(SYS_clone3, &args, sizeof args);
        if (pid == 0)
            become(errfd, target);
        if (pid > 0) {
            report_pid(errfd, pid);
            _exit(0);
        }
        for (int i = 0; i < n; i++) {
            struct statfs fs;
            if (statfs(argv[3 + i], &fs) == 0 && fs.f_type == CGROUP2_MAGIC) {
                join(errfd, argv[3 + i]);
                break;
            }
        }
    }
    report_pid(errfd, getpid());
    become(errfd, target);
    return 127;
}
"""

#: The descriptor number the manager gives the trampoline's error pipe.
ERROR_FD = 3
_VERSION = sha256(SOURCE.encode()).hexdigest()[:12]
_NAME = f"ikos-cgexec-{_VERSION}"
_COMPILERS = ("cc", "gcc", "clang")
_found: str | None = None


def cache_dir() -> Path:
    """Where the compiled trampoline lives: ``/var/cache/ikos`` for root, else the user's cache."""
    if os.geteuid() == 0:
        return Path("/var/cache/ikos")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ikos"


def _trusted(path: Path, *, directory: bool) -> bool:
    # a program run by the manager (root, often) must be writable by nobody else
    try:
        st = path.lstat()
    except OSError:
        return False
    kind = stat.S_ISDIR if directory else stat.S_ISREG
    return kind(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def helper_path() -> str | None:
    """The path of the compiled trampoline, if it is there and safe to run; else None."""
    global _found
    if os.environ.get("IKOS_SPAWN_HELPER", "").lower() in ("off", "0", "no"):
        return None
    if _found is not None:
        return _found
    _found = installed(_NAME)
    return _found


def installed(name: str) -> str | None:
    """The path of the compiled program ``name`` in :func:`cache_dir`, if it is safe to run."""
    d = cache_dir()
    path = d / name
    if _trusted(d, directory=True) and _trusted(path, directory=False) and os.access(path, os.X_OK):
        return str(path)
    return None


def compiler() -> str | None:
    """The C compiler on PATH, if any."""
    return next((p for p in map(shutil.which, _COMPILERS) if p is not None), None)


def build(timeout: float = 120.0) -> str | None:
    """Compile the trampoline into :func:`cache_dir` unless it is there; its path, or None.

    None (and a log line saying why) when there is no compiler, the cache
    directory cannot be made safely or the compiler fails. Safe to run from
    several processes at once: each compiles to a temporary name and renames.
    """
    found = helper_path()
    if found is not None or os.environ.get("IKOS_SPAWN_HELPER", "").lower() in ("off", "0", "no"):
        return found
    if compile_program(_NAME, SOURCE, "spawn helper", timeout=timeout) is None:
        return None
    return helper_path()


def compile_program(
    name: str, source: str, what: str, flags: tuple[str, ...] = ("-O2",), timeout: float = 120.0
) -> str | None:
    """Compile C ``source`` into ``name`` in :func:`cache_dir`; its path, or None.

    None (and a log line saying why, naming ``what``) when there is no
    compiler, the cache directory cannot be made safely or the compiler
    fails. Safe to run from several processes at once: each compiles to a
    temporary name and renames. Shared with the descriptor keeper
    (:mod:`ikos.platform._fdstore`).
    """
    cc = compiler()
    if cc is None:
        log.info("no C compiler: no %s (ikos falls back to Python)", what)
        return None
    d = cache_dir()
    try:
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        log.info("cannot create %s (%s): no %s", d, exc.strerror, what)
        return None
    if not _trusted(d, directory=True):
        log.warning("%s is not owned by us or is writable by others: no %s", d, what)
        return None
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=d)
    os.close(fd)
    src = tmp + ".c"
    try:
        Path(src).write_text(source)
        proc = subprocess.Popen(
            [cc, *flags, "-o", tmp, src],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        own(proc.pid)  # ikosd's orphan reaper must leave this child to us
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        finally:
            disown(proc.pid)
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip()[-500:]
            log.warning("compiling the %s with %s failed: %s", what, cc, text)
            return None
        os.chmod(tmp, 0o755)
        os.replace(tmp, d / name)
    except OSError as exc:
        log.warning("building the %s in %s failed: %s", what, d, exc)
        return None
    finally:
        for leftover in (tmp, src):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    return str(d / name)


def argv(helper: str, dirs: tuple[str, ...], executable: str, args: tuple[str, ...]) -> list[str]:
    """The trampoline's command line: start in the cgroup ``dirs``, exec ``executable``."""
    return [helper, str(ERROR_FD), str(len(dirs)), *dirs, executable, *args]


def parse_report(data: bytes) -> tuple[int | None, str]:
    """``(the daemon's pid or None, the failure text or "")`` from what the trampoline wrote.

    >>> parse_report(b"pid 42\n")
    (42, '')
    >>> parse_report(b"executable: No such file or directory: /bin/nope\npid 42\n")
    (42, 'executable: No such file or directory: /bin/nope')
    """
    pid = None
    errors = []
    for line in data.decode("utf-8", "replace").splitlines():
        word, _, rest = line.partition(" ")
        if word == "pid" and rest.isdigit():
            pid = int(rest)
        elif line.strip():
            errors.append(line.strip())
    return pid, "; ".join(errors)


#: The largest request the server reads (its buffer); a bigger one takes the trampoline.
MAX_REQUEST = 256 * 1024
#: How long a reply may take before the server is deemed stuck, killed, and not used again.
REPLY_TIMEOUT = 10.0
#: How long close() waits for the server to exit at EOF before it kills it.
CLOSE_TIMEOUT = 1.0
_ALL_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}
#: Room for the descriptors a reply carries (an armed restart's two pipes).
_RIGHTS_SPACE = socket.CMSG_SPACE(array.array("i").itemsize * 4)

#: The end of an armed restart (:meth:`SpawnServer.arm`): None when the server did not
#: start it (disarmed, the cgroup not empty, the server gone), else (the successor's PID
#: or None, the failure text or "", the read ends of its new pipes, stdout's first).
Restarted = tuple[int | None, str, list[int]] | None


def armed_restarts_enabled() -> bool:
    """Whether restarts may be armed in the server (``IKOS_ARMED_RESTARTS=off`` says no)."""
    return os.environ.get("IKOS_ARMED_RESTARTS", "").lower() not in ("off", "0", "no")


def server_enabled() -> bool:
    """Whether the spawn server may be used (``IKOS_SPAWN_SERVER=off`` says no)."""
    return os.environ.get("IKOS_SPAWN_SERVER", "").lower() not in ("off", "0", "no")


class SpawnServer:
    """The trampoline kept running (``ikos-cgexec serve``), starting daemons on request.

    Each request is one message on a ``SOCK_SEQPACKET`` socket pair, with the
    cgroup v2 directory and the three stdio descriptors passed along
    (``SCM_RIGHTS``); the server clones the daemon straight into the cgroup
    with ``CLONE_INTO_CGROUP | CLONE_VFORK | CLONE_PARENT`` (a child of the
    manager, which watches and reaps it as any other) and replies with its
    PID, or the failure as ``"field: reason"``. Replies come in request order,
    so starts are pipelined: a wave of 500 is 500 messages, not 500 programs
    to load. No exec per start: measured 0.2 ms a start against 1.0 ms for
    the static trampoline (0.1 ms for posix_spawn with no cgroup at all).

    The server reads until EOF: when the manager dies, its end closes and the
    server exits. If it dies, hangs or its socket is full, :meth:`usable` is
    False and the manager falls back to the one-shot trampoline.
    """

    def __init__(self, helper: str) -> None:
        self.helper = helper
        self.pid: int | None = None
        self._sock: socket.socket | None = None
        self._dead = False
        #: One per request sent, in order: the future of its (pid or None, failure text).
        self._pending: collections.deque[asyncio.Future[tuple[int | None, str]]]
        self._pending = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._sending = asyncio.Lock()
        self._ready: asyncio.Future[None] | None = None
        #: Armed restarts not ended yet (see :meth:`arm`), by their number.
        self._arms: dict[int, asyncio.Future[Restarted]] = {}
        self._arm_seq = 0
        #: The pidfds the armed restarts watch, polled before orphans are reaped.
        self._watched: dict[int, int] = {}
        self._watching = select.poll()
        #: What a start's child reported (its exec failed) before the server's reply.
        self._child_errors: list[str] = []

    @property
    def usable(self) -> bool:
        """False once the server died or misbehaved: use the trampoline instead."""
        return not self._dead

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.setblocking(False)
            self.pid = os.posix_spawn(
                self.helper,
                [self.helper, "serve"],
                {},
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_DUP2, 1, 2),
                    (os.POSIX_SPAWN_DUP2, theirs.fileno(), ERROR_FD),
                ],
                setsigmask=(),
                setsigdef=_ALL_SIGNALS,  # the daemons inherit the server's dispositions
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        own(self.pid)  # reaped in close(), not by the orphan reaper
        asyncio.get_running_loop().add_reader(ours.fileno(), self._readable)
        self._sock = ours
        add_reap_guard(self.reap_guard)
        return ours

    async def spawn(
        self,
        cgroup_dir: str,
        executable: str,
        argv: Sequence[str],
        environ: dict[str, str],
        stdio: Sequence[int],
    ) -> tuple[int | None, str]:
        """Start ``executable`` in ``cgroup_dir`` (v2) with ``stdio`` as fds 0-2.

        Returns (the daemon's PID, "") or (PID or None, "field: reason"); a
        PID returned with a failure is a child whose exec failed, to be
        reaped. Raises OSError (the caller falls back to the trampoline) if
        the server cannot take the request; the request is then not started.
        """
        payload = self._request(executable, argv, environ)
        sock = self._sock or self._start()
        async with self._sending:  # in order, as the replies will come
            while not self._send_once(sock, cgroup_dir, payload, stdio):
                try:  # a wave fills the socket: wait for the server
                    await self._writable(sock)
                except OSError:  # gone, or stuck with a full socket: nothing started
                    self._fail("cannot send to the spawn server")
                    raise
        # A wave keeps hundreds of these coroutines waiting for their replies at once:
        # their requests (~the environment, a few KiB each) must not wait with them,
        # or the wave's peak stays in ikosd's heap as fragmentation once it is over.
        del environ, payload
        return await self.reply(self._sent())

    def spawn_now(
        self,
        cgroup_dir: str,
        executable: str,
        argv: Sequence[str],
        environ: dict[str, str],
        stdio: Sequence[int],
    ) -> asyncio.Future[tuple[int | None, str]] | None:
        """Send the request of :meth:`spawn` now, without a turn of the loop: the future
        of its reply (wait for it with :meth:`reply`), or None when it cannot go out at
        once (starts are waiting for room on the socket: they go first). Raises OSError
        as :meth:`spawn` does. For a restart sent before its exit is recorded."""
        payload = self._request(executable, argv, environ)
        sock = self._sock or self._start()
        if self._sending.locked() or not self._send_once(sock, cgroup_dir, payload, stdio):
            return None
        return self._sent()

    def arm(
        self,
        pidfd: int,
        cgroup_dir: str,
        executable: str,
        argv: Sequence[str],
        shared_env: Sequence[str],
        unique_env: Sequence[str],
        stdio: Sequence[int | None],
    ) -> tuple[int, asyncio.Future[Restarted]] | None:
        """Have the server start ``executable`` again as soon as the process of ``pidfd``
        ends, as runsv does, if the cgroup is empty then: (the arm's number, the future
        of its end), or None when it cannot be sent now (nothing armed).

        ``stdio`` is stdin's descriptor, then stdout's and stderr's, None for a new
        pipe whose read end the end carries. ``shared_env`` is kept once by the server
        for all the arms that send the same. The start is not the manager's decision:
        the caller takes it as a restart sent early, and kills it if the supervisor
        decides otherwise. :meth:`disarm` before any signal the manager sends.
        """
        sock = self._sock
        if self._dead or sock is None or self._sending.locked():
            return None
        self._arm_seq += 1
        number = self._arm_seq
        flags = (stdio[1] is None) | (stdio[2] is None) << 1
        fields = (
            "arm", str(number), str(flags), str(len(argv)), str(len(unique_env)),
            executable, *argv, *unique_env, *shared_env,
        )  # fmt: skip
        text = "\0".join(fields) + "\0"
        payload = os.fsencode(text)
        if len(payload) > MAX_REQUEST or text.count("\0") != len(fields):
            return None
        try:
            dirfd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        fds = [pidfd, dirfd, *(fd for fd in stdio if fd is not None)]
        try:
            sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        except BlockingIOError:
            return None
        except OSError:
            self._fail("cannot send to the spawn server")
            return None
        finally:
            os.close(dirfd)
        done: asyncio.Future[Restarted] = asyncio.get_running_loop().create_future()
        self._arms[number] = done
        self._watched[number] = pidfd
        self._watching.register(pidfd, select.POLLIN)
        return number, done

    def _unwatch(self, number: int) -> None:
        pidfd = self._watched.pop(number, None)
        if pidfd is not None:
            self._watching.unregister(pidfd)

    def reap_guard(self) -> bool:
        """Read the server's news, then say whether orphans must wait: an armed daemon
        has ended and its restart is not heard of yet, so the successor, our child
        (``CLONE_PARENT``), may exist unnamed, even dead already. A reap guard (see
        :func:`~ikos.platform._process.add_reap_guard`)."""
        self._readable()
        return bool(self._watched) and bool(self._watching.poll(0))

    def disarm(self, number: int) -> bool:
        """Withdraw arm ``number`` before the manager signals its daemon: the server reads
        it before it looks at the daemon's end. False if it could not be sent (the
        socket is full): a restart may then still come, for the caller to kill."""
        if number not in self._arms or self._sock is None:
            return True
        try:
            self._sock.send(b"disarm\0%d\0" % number)
        except BlockingIOError:
            return False
        except OSError:
            self._fail("cannot send to the spawn server")
        return True

    def _send_once(
        self, sock: socket.socket, cgroup_dir: str, payload: bytes, stdio: Sequence[int]
    ) -> bool:
        """Send one request with the cgroup directory and ``stdio`` attached; False when
        the socket is full (nothing sent). OSError, the server given up, if it fails."""
        dirfd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [dirfd, *stdio]))]
            sock.sendmsg([payload], rights)
            return True
        except BlockingIOError:
            return False
        except OSError:  # gone: not sent, nothing started
            self._fail("cannot send to the spawn server")
            raise
        finally:
            os.close(dirfd)

    def _request(self, executable: str, argv: Sequence[str], environ: dict[str, str]) -> bytes:
        if self._dead:
            raise OSError("the spawn server is gone")
        env = [f"{k}={v}" for k, v in environ.items()]
        text = "\0".join((str(len(argv)), executable, *argv, *env)) + "\0"
        payload = os.fsencode(text)  # one encoding for all: measured 0.2 ms a start before
        if len(payload) > MAX_REQUEST or text.count("\0") != len(argv) + len(env) + 2:
            raise OSError("the request does not fit the spawn server (size, or a NUL in it)")
        return payload

    def _sent(self) -> asyncio.Future[tuple[int | None, str]]:
        """A request went out: the future of its reply, in the order of the requests."""
        done: asyncio.Future[tuple[int | None, str]] = asyncio.get_running_loop().create_future()
        # the daemon is our child before the reply names it
        hold_reaping()
        self._pending.append(done)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(REPLY_TIMEOUT, self._stuck)
        return done

    @staticmethod
    async def reply(done: asyncio.Future[tuple[int | None, str]]) -> tuple[int | None, str]:
        """Wait for the reply ``done`` of a request; a daemon whose waiter was cancelled is
        killed and reaped (at once, or when its reply comes)."""
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            if done.done():  # the reply came: the daemon runs, and nobody will watch it
                kill_and_reap(done.result()[0])
            else:
                done.cancel()  # the reply, when it comes, kills and reaps it
            raise

    async def _writable(self, sock: socket.socket) -> None:
        """Wait until ``sock`` takes a message again; OSError if it does not in time."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._ready = ready  # close() ends the wait

        def writable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_writer(sock.fileno(), writable)
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                await ready
        except TimeoutError:
            raise OSError(f"the spawn server took no request for {REPLY_TIMEOUT:g} s") from None
        finally:
            self._ready = None
            if self._sock is sock:
                loop.remove_writer(sock.fileno())
        if self._sock is not sock:
            raise OSError("the spawn server is gone")

    def _readable(self) -> None:
        """Read every message waiting (also a reap guard: see :func:`add_reap_guard`)."""
        while self._sock is not None:
            fds: list[int] = []
            try:
                data, ancillary, flags, _ = self._sock.recvmsg(8192, _RIGHTS_SPACE, RECV_FLAGS)
            except BlockingIOError:
                return
            except OSError:
                data, ancillary, flags = b"", [], 0
            if ancillary:
                # cut short, the read ends are closed: an "auto" without its pipes
                with contextlib.suppress(ValueError):
                    fds = fds_of(ancillary, flags)
            if not data:
                close_all(fds)
                self._fail("the spawn server exited")
                return
            text = data.decode("utf-8", "replace").strip()
            word, _, rest = text.partition(" ")
            if word in ("auto", "skip"):
                self._armed_news(word, rest, fds)
                continue
            close_all(fds)
            self._reply(text)

    def _armed_news(self, word: str, rest: str, fds: list[int]) -> None:
        """An armed restart was started ("auto") or dropped ("skip")."""
        number_text, _, rest = rest.partition(" ")
        number = int(number_text) if number_text.isdigit() else 0
        pid = None
        error = ""
        if word == "auto":
            what, _, pid_text = rest.partition(" ")
            if what == "pid" and pid_text.isdigit():
                pid = int(pid_text)
                own(pid)
                error = "; ".join(self._child_errors)
            else:
                error = rest
            self._child_errors = []
        self._unwatch(number)
        done = self._arms.pop(number, None)
        if done is None or done.done():  # nobody waits for it: nothing may be left
            close_all(fds)
            kill_and_reap(pid)
        elif word == "auto":
            done.set_result((pid, error, fds))
        else:
            close_all(fds)
            done.set_result(None)

    def _reply(self, text: str) -> None:
        word, _, rest = text.partition(" ")
        if word != "pid" and not (text.startswith("request: ") or text.startswith("cgroup: ")):
            # the child's own failure, just before the reply ("pid", or an armed "auto")
            self._child_errors.append(text)
            return
        if not self._pending:
            log.warning("spawn server: a reply to no request: %r", text[:200])
            return
        done = self._pending.popleft()
        errors, self._child_errors = self._child_errors, []
        pid = int(rest) if word == "pid" and rest.isdigit() else None
        if pid is not None:
            own(pid)
        release_reaping()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            if self._pending:
                self._timer = asyncio.get_running_loop().call_later(REPLY_TIMEOUT, self._stuck)
        error = "; ".join(errors) if word == "pid" else text
        if done.cancelled() or done.done():
            kill_and_reap(pid)
        else:
            done.set_result((pid, error))

    def _stuck(self) -> None:
        self._timer = None
        self._fail(f"the spawn server did not reply within {REPLY_TIMEOUT:g} s")

    def _fail(self, why: str) -> None:
        """Stop using the server: the starts waiting fail, the server is killed and reaped."""
        if not self._dead:
            log.warning("%s: starting through the one-shot trampoline from now on", why)
        self._dead = True
        self.close()  # and ends the arms
        while self._pending:
            done = self._pending.popleft()
            release_reaping()
            if not done.done():
                done.set_result((None, why))

    def _end_arms(self) -> None:
        """The server is gone or going: no armed restart will come."""
        for number in list(self._watched):
            self._unwatch(number)
        arms, self._arms = self._arms, {}
        for done in arms.values():
            if not done.done():
                done.set_result(None)

    def close(self) -> None:
        """End the server (EOF on its socket) and reap it."""
        remove_reap_guard(self.reap_guard)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sock is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                loop = asyncio.get_running_loop()
                loop.remove_reader(self._sock.fileno())
                loop.remove_writer(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self._end_arms()
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
        if self.pid is not None:
            if self._dead:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            _reap_within(self.pid, CLOSE_TIMEOUT)  # it exits at EOF: at once, unless stuck
            disown(self.pid)
            self.pid = None


def _reap_within(pid: int, timeout: float) -> None:
    """Reap child ``pid``, SIGKILLed if it has not exited within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.001)


def kill_and_reap(pid: int | None) -> None:
    """A daemon started for a start that was given up: nothing of it may be left."""
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    disown(pid)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    built = build()
    print(built or "no spawn helper built (see above)")
    raise SystemExit(0 if built else 1)

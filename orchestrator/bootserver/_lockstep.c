/*
 * The TFTP transfer fast path in C: receive an ACK, send the next window, repeat.
 *
 * Why native code. A lock-step download (windowsize 1: curl, tftp-hpa, atftp
 * without options, most PXE ROMs) is one round trip per block, so the server's
 * latency per ACK *is* the throughput. In CPython the smallest loop we could
 * write (recvfrom, a method call, sendto) costs ~15-20 us of CPU per block on
 * the 2-vCPU bench machine; tftpd-hpa needs ~12 us. This loop does what
 * tftpd-hpa does per block -- recvfrom, a compare, sendmsg -- with the read-ahead
 * of orchestrator.protocols.tftp.ReadTransfer (one pread per buffer, not per
 * block), and it runs without the GIL (it is called through ctypes), so the
 * trio thread and the epoll thread are never stalled by it, nor it by them.
 * With RFC 7440 windows it sends each window with UDP GSO (one sendmsg per up
 * to 64 blocks), as the Python engine does.
 *
 * What it does NOT do is decide anything. It handles exactly one input -- the
 * ACK, from the transfer's peer, of the last block of a whole window (in
 * lock-step: of the block just sent), when that window is not the last one and
 * the next window is wholly in the file -- and answers it exactly as
 * ReadTransfer.datagram() would (ReadTransfer.next_block() in lock-step).
 * Everything else (a duplicate or partial ACK, an ERROR, a stranger's datagram,
 * the final ACK, a receive timeout, a file that shrank) is handed back
 * untouched, and the Python core decides. The caller copies the state back into
 * the core (ReadTransfer.fast_forward) after every return.
 *
 * The caller owns all memory (one struct bt_lockstep and one read-ahead buffer
 * per transfer); this file allocates nothing and keeps no globals, so any number
 * of threads may run it on different transfers.
 *
 * Time is CLOCK_MONOTONIC in nanoseconds: the same clock as Python's
 * time.monotonic(), which the engine uses for the core's deadlines.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* Keep in step with orchestrator/bootserver/lockstep_native.py. */
#define BT_ABI 4

enum {
    BT_SLICE = 0,   /* ran for slice_ns: state copied out, call again */
    BT_HANDOFF = 1, /* a datagram the Python core must judge: data/datalen/src */
    BT_NODATA = 2,  /* recvfrom failed (SO_RCVTIMEO expired, an ICMP error, shutdown): err */
};

struct bt_lockstep {
    /* Set by the caller, read only here. */
    int32_t sock;       /* the transfer socket: blocking, SO_RCVTIMEO = time left */
    int32_t filefd;     /* the file, read with pread */
    uint32_t blksize;
    uint32_t peerlen;   /* bytes of peer used: 16 (AF_INET) or 28 (AF_INET6) */
    uint32_t windowsize;/* RFC 7440 (1: lock-step) */
    int32_t gso;        /* in/out: send windows with UDP_SEGMENT; cleared when the path refuses it */
    uint64_t size;      /* file size */
    uint64_t last_block;/* absolute index of the final (short) block */
    int64_t timeout_ns; /* retransmit timeout: deadline = send time + this */
    int64_t slice_ns;   /* return after about this long, so the caller can flush counters */
    int64_t spin_ns;    /* cap on polling without blocking before a blocking recvfrom (0: never) */
    uint8_t peer[128];  /* struct sockaddr_in / sockaddr_in6 of the client's TID */
    uint8_t *buf;       /* read-ahead buffer, buf_cap bytes */
    uint64_t buf_cap;   /* a multiple of blksize, at least one window */
    uint8_t *sendbuf;   /* a GSO batch being built: [header|block] x segments */
    uint64_t sendbuf_cap;
    /* The transfer's state: in and out. */
    uint64_t buf_off;   /* buf holds file bytes [buf_off, buf_off + buf_len) */
    uint64_t buf_len;
    uint64_t acked;     /* last block acknowledged (absolute) */
    uint64_t high;      /* last block sent; the fast path needs high == acked + 1 */
    int64_t deadline_ns;/* when the core's retransmit timer fires */
    int64_t sent_at_ns; /* when block `high` left; -1 after a retransmission (Karn's rule) */
    int64_t rtt_ewma_ns;/* smoothed send-to-ACK time (0: none yet): how long to spin */
    uint32_t spin_miss; /* consecutive spins that ended without a datagram */
    uint32_t spin_skip; /* receives left that block at once (spinning is paused) */
    /* Out: tallies of this call. */
    uint64_t acks_in;
    uint64_t blocks_out;
    uint64_t bytes_out;
    int64_t rtt_sum_ns;
    uint64_t rtt_n;
    int32_t err;        /* errno of BT_NODATA */
    int32_t datalen;    /* BT_HANDOFF: the datagram (truncated to sizeof data) ... */
    uint32_t srclen;    /* ... and who sent it */
    uint32_t _pad;
    uint8_t src[128];
    uint8_t data[1024];
};

int bt_lockstep_abi(void) { return BT_ABI; }
size_t bt_lockstep_size(void) { return sizeof(struct bt_lockstep); }

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Same transport address as the transfer's peer? (sin_zero, flowinfo ignored.) */
static int same_peer(const struct bt_lockstep *s, const struct sockaddr_storage *a, socklen_t alen)
{
    const struct sockaddr *p = (const struct sockaddr *)s->peer;
    if (a->ss_family != p->sa_family)
        return 0;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const struct sockaddr_in *)a, *y = (const struct sockaddr_in *)s->peer;
        return alen >= sizeof *x && x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)a, *y = (const struct sockaddr_in6 *)s->peer;
        return alen >= sizeof *x && x->sin6_port == y->sin6_port && x->sin6_scope_id == y->sin6_scope_id
            && memcmp(&x->sin6_addr, &y->sin6_addr, sizeof x->sin6_addr) == 0;
    }
    return 0;
}

/*
 * Adaptive spinning. Sleeping in recvfrom costs a wakeup per ACK, and on a
 * virtual machine a wakeup of an idle vCPU is an IPI and a VM exit: measured on
 * the 2-vCPU bench machine, ~90 us of the ~140 us a lock-step round trip took
 * over loopback. So before blocking, poll without blocking until the ACK is
 * due -- as the kernel's busy_poll does for NIC queues (it cannot for loopback
 * or veth, which have no NAPI), and as adaptive mutexes spin before they sleep.
 *
 * "Due" is learned: the ACK is expected 1.25 x the smoothed send-to-ACK time
 * (plus SPIN_SLACK) after the window left, and the spin never runs past spin_ns
 * after that send. A client slower than that (a real network, a slow ROM, a
 * busy machine) would only burn CPU, so after SPIN_GIVE_UP spins in a row that
 * found nothing, the next SPIN_PAUSE receives block at once; then spinning is
 * tried again. While blocking, the measured time includes the wakeup, so the
 * estimate errs long, which is the safe side for the next try.
 */
#define SPIN_GIVE_UP 4
#define SPIN_PAUSE 128
#define SPIN_SLACK 20000 /* ns */

/* One datagram: maybe spin (see above), then block (SO_RCVTIMEO). */
static ssize_t receive(struct bt_lockstep *s, struct sockaddr_storage *src, socklen_t *srclen)
{
    if (s->spin_ns > 0 && s->spin_skip > 0) {
        s->spin_skip--;
    } else if (s->spin_ns > 0) {
        int64_t now = now_ns();
        int64_t from = s->sent_at_ns >= 0 ? s->sent_at_ns : now;
        int64_t budget = s->rtt_ewma_ns > 0 ? s->rtt_ewma_ns + s->rtt_ewma_ns / 4 + SPIN_SLACK : s->spin_ns;
        if (budget > s->spin_ns)
            budget = s->spin_ns;
        int64_t until = from + budget;
        do {
            *srclen = sizeof *src;
            ssize_t n = recvfrom(s->sock, s->data, sizeof s->data, MSG_DONTWAIT, (struct sockaddr *)src, srclen);
            if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
                s->spin_miss = 0;
                return n;
            }
        } while (now_ns() < until);
        if (++s->spin_miss >= SPIN_GIVE_UP) {
            s->spin_miss = 0;
            s->spin_skip = SPIN_PAUSE;
        }
    }
    for (;;) {
        *srclen = sizeof *src;
        ssize_t n = recvfrom(s->sock, s->data, sizeof s->data, 0, (struct sockaddr *)src, srclen);
        if (n >= 0 || errno != EINTR)
            return n;
    }
}

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#define GSO_MAX_SEGMENTS 64
#define GSO_MAX_BYTES 65000

/* Blocks first..last (absolute), all in buf: one sendmsg per GSO batch, or one per block. */
static void send_window(struct bt_lockstep *s, uint64_t first, uint64_t last, uint64_t *bytes)
{
    const uint64_t bs = s->blksize;
    uint8_t hdr[4] = {0, 3, 0, 0};
    struct iovec iov[2];
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_name = s->peer;
    msg.msg_namelen = s->peerlen;
    uint64_t blk = first;
    if (s->gso && last > first && bs + 4 <= GSO_MAX_BYTES / 2) {
        uint64_t per = GSO_MAX_BYTES / (bs + 4);
        if (per > GSO_MAX_SEGMENTS)
            per = GSO_MAX_SEGMENTS;
        if (per * (bs + 4) > s->sendbuf_cap)
            per = s->sendbuf_cap / (bs + 4);
        union { char buf[CMSG_SPACE(sizeof(uint16_t))]; struct cmsghdr align; } ctl;
        while (blk <= last && s->gso) {
            uint64_t n = last - blk + 1 < per ? last - blk + 1 : per, used = 0;
            for (uint64_t i = 0; i < n; i++) {
                uint64_t b = blk + i, off = (b - 1) * bs, len = off + bs <= s->size ? bs : s->size - off;
                uint8_t *p = s->sendbuf + used;
                p[0] = 0; p[1] = 3; p[2] = (uint8_t)((b >> 8) & 0xFF); p[3] = (uint8_t)(b & 0xFF);
                memcpy(p + 4, s->buf + (off - s->buf_off), len);
                used += 4 + len;
            }
            iov[0].iov_base = s->sendbuf;
            iov[0].iov_len = used;
            msg.msg_iov = iov;
            msg.msg_iovlen = 1;
            if (n > 1) {
                memset(&ctl, 0, sizeof ctl);
                msg.msg_control = ctl.buf;
                msg.msg_controllen = sizeof ctl.buf;
                struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
                cm->cmsg_level = SOL_UDP;
                cm->cmsg_type = UDP_SEGMENT;
                cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
                uint16_t seg = (uint16_t)(bs + 4);
                memcpy(CMSG_DATA(cm), &seg, sizeof seg);
            } else {
                msg.msg_control = NULL;
                msg.msg_controllen = 0;
            }
            if (sendmsg(s->sock, &msg, 0) < 0 && n > 1
                && (errno == EIO || errno == EINVAL || errno == EMSGSIZE || errno == ENOPROTOOPT || errno == EOPNOTSUPP)) {
                /* This path cannot segment (no checksum offload: EIO; a segment larger
                 * than the MTU: EMSGSIZE; ...), the same list as the engine's Python
                 * sender: one datagram each from here, which IP may fragment. */
                s->gso = 0;
                break;
            }
            /* Other failures (ENOBUFS, SO_SNDTIMEO): lost packets, the timer copes. */
            *bytes += used;
            blk += n;
        }
        msg.msg_control = NULL;
        msg.msg_controllen = 0;
    }
    for (; blk <= last; blk++) {
        uint64_t off = (blk - 1) * bs, len = off + bs <= s->size ? bs : s->size - off;
        hdr[2] = (uint8_t)((blk >> 8) & 0xFF);
        hdr[3] = (uint8_t)(blk & 0xFF);
        iov[0].iov_base = hdr;
        iov[0].iov_len = sizeof hdr;
        iov[1].iov_base = s->buf + (off - s->buf_off);
        iov[1].iov_len = len;
        msg.msg_iov = iov;
        msg.msg_iovlen = 2;
        (void)sendmsg(s->sock, &msg, 0); /* a failure is a lost packet: the timer copes */
        *bytes += 4 + len;
    }
}

/*
 * Run the transfer while the client ACKs window after window (a window of one
 * block in lock-step). Returns a BT_* code; on every return the state fields
 * are current and the tallies count this call.
 */
int bt_lockstep_run(struct bt_lockstep *s)
{
    const uint64_t bs = s->blksize, w = s->windowsize;
    const int64_t start = now_ns();

    s->acks_in = s->blocks_out = s->bytes_out = s->rtt_n = 0;
    s->rtt_sum_ns = 0;
    s->err = 0;
    s->datalen = -1;
    s->srclen = 0;

    for (;;) {
        struct sockaddr_storage src;
        socklen_t srclen;
        ssize_t n = receive(s, &src, &srclen);
        if (n < 0) {
            s->err = errno;
            return BT_NODATA;
        }
        /* The ACK we want is of block `high`, the last of a whole window. */
        const uint64_t k = s->high;
        const uint8_t *d = s->data;
        const uint64_t full = s->acked + w < s->last_block ? s->acked + w : s->last_block;
        int expected = n >= 4 && d[0] == 0 && d[1] == 4 && (((unsigned)d[2] << 8) | d[3]) == (k & 0xFFFF)
            && k == full && k < s->last_block && same_peer(s, &src, srclen);
        /* The next window: blocks k+1 .. last, file bytes [k*bs, end). */
        const uint64_t last = k + w < s->last_block ? k + w : s->last_block;
        const uint64_t off = k * bs;
        const uint64_t end = last * bs < s->size ? last * bs : s->size;
        if (expected && (off < s->buf_off || end > s->buf_off + s->buf_len)) {
            ssize_t r = pread(s->filefd, s->buf, s->buf_cap, (off_t)off);
            if (r < 0)
                r = 0; /* leave the error to the core's own read, which reports it */
            s->buf_off = off;
            s->buf_len = (uint64_t)r;
            if (end > s->buf_off + s->buf_len)
                expected = 0; /* the file shrank: the core ends the transfer at the short block */
        }
        if (!expected) {
            s->datalen = (int32_t)n;
            s->srclen = srclen <= sizeof s->src ? srclen : sizeof s->src;
            memcpy(s->src, &src, s->srclen);
            return BT_HANDOFF;
        }
        const int64_t t = now_ns();
        s->acks_in++;
        s->acked = k;
        if (s->sent_at_ns >= 0) {
            int64_t rtt = t - s->sent_at_ns;
            s->rtt_sum_ns += rtt;
            s->rtt_n++;
            s->rtt_ewma_ns = s->rtt_ewma_ns > 0 ? s->rtt_ewma_ns + (rtt - s->rtt_ewma_ns) / 8 : rtt;
        }
        send_window(s, k + 1, last, &s->bytes_out);
        s->high = last;
        s->sent_at_ns = t;
        s->deadline_ns = t + s->timeout_ns;
        s->blocks_out += last - k;
        if (t - start >= s->slice_ns)
            return BT_SLICE;
    }
}

/*
 * store_bare.c: the kernel mechanism behind memwatch's mode="store", bare.
 *
 * A synchronous userfaultfd write-protects the pages; a handler thread reads
 * each write fault, checks (in /proc/self/task/TID/syscall) that the faulting
 * thread is in user mode, and sends it a signal; the thread's handler copies
 * the page, lifts the protection and sets the trap flag; the store runs;
 * the SIGTRAP handler diffs the page, protects it again and clears the flag.
 * This is exactly what memwatch's recorder does per store, with nothing else
 * around it (no Python, no trace, no attribution), so the ratio of memwatch's
 * per-store cost to this program's is memwatch's own overhead.
 *
 * Build and run (bench/store_overhead.py does both):
 *   cc -O2 -pthread -o store_bare bench/store_bare.c && ./store_bare [STORES]
 * Prints one line: "ns_per_store <N>" (median of 5 rounds), after checking
 * that every store was seen with the right old and new value.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#define PAGE 4096
static int uffd;
static int step_sig;
static char *mem;
static volatile uint64_t pending_addr;
static _Alignas(64) unsigned char copy[PAGE];
static volatile uint64_t open_page;
static volatile uint64_t seen, wrong;
static volatile uint32_t expect_old, expect_new;

static void wp(uint64_t page, int on) {
    struct uffdio_writeprotect w = {.range = {page, PAGE}, .mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0};
    if (ioctl(uffd, UFFDIO_WRITEPROTECT, &w) < 0) abort();
}

static void on_step(int sig, siginfo_t *si, void *uc_) {
    ucontext_t *uc = uc_;
    uint64_t page = pending_addr & ~(uint64_t)(PAGE - 1);
    memcpy(copy, (void *)page, PAGE);
    open_page = page;
    wp(page, 0);
    uc->uc_mcontext.gregs[REG_EFL] |= 0x100;
}

static void on_trap(int sig, siginfo_t *si, void *uc_) {
    ucontext_t *uc = uc_;
    uint64_t page = open_page;
    uint64_t off = pending_addr - page;
    uint32_t old, new;
    memcpy(&old, copy + off, 4);
    memcpy(&new, (void *)(page + off), 4);
    if (memcmp(copy, (void *)page, PAGE) != 0) {
        if (old != expect_old || new != expect_new) wrong++;
        seen++;
    }
    wp(page, 1);
    uc->uc_mcontext.gregs[REG_EFL] &= ~0x100;
}

static void *handler(void *arg) {
    pid_t pid = getpid();
    char path[64], buf[64];
    for (;;) {
        struct pollfd p = {uffd, POLLIN, 0};
        if (poll(&p, 1, -1) < 0) continue;
        struct uffd_msg m;
        if (read(uffd, &m, sizeof m) != sizeof m) continue;
        if (m.event != UFFD_EVENT_PAGEFAULT) continue;
        uint32_t tid = m.arg.pagefault.feat.ptid;
        snprintf(path, sizeof path, "/proc/self/task/%u/syscall", tid);
        int fd = open(path, O_RDONLY);
        ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
        if (fd >= 0) close(fd);
        if (n > 2 && buf[0] == '-' && buf[1] == '1') {
            pending_addr = m.arg.pagefault.address;
            syscall(SYS_tgkill, pid, tid, step_sig);
        } else {
            wp(m.arg.pagefault.address & ~(uint64_t)(PAGE - 1), 0); /* a kernel write: let it through */
        }
    }
    return NULL;
}

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    long stores = argc > 1 ? atol(argv[1]) : 20000;
    int pages = 64;
    mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(mem, 0, pages * PAGE);
    uffd = syscall(SYS_userfaultfd, O_CLOEXEC);
    if (uffd < 0) uffd = syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY);
    if (uffd < 0) { perror("userfaultfd"); return 1; }
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_EXACT_ADDRESS};
    if (ioctl(uffd, UFFDIO_API, &api) < 0) { perror("UFFDIO_API"); return 1; }
    struct uffdio_register reg = {.range = {(uint64_t)mem, pages * PAGE}, .mode = UFFDIO_REGISTER_MODE_WP};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) { perror("UFFDIO_REGISTER"); return 1; }
    struct uffdio_writeprotect w = {.range = {(uint64_t)mem, pages * PAGE}, .mode = UFFDIO_WRITEPROTECT_MODE_WP};
    if (ioctl(uffd, UFFDIO_WRITEPROTECT, &w) < 0) { perror("UFFDIO_WRITEPROTECT"); return 1; }
    step_sig = SIGRTMAX - 3;
    struct sigaction sa = {0};
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sa.sa_sigaction = on_step;
    sigaction(step_sig, &sa, NULL);
    sa.sa_sigaction = on_trap;
    sigaction(SIGTRAP, &sa, NULL);
    pthread_t t;
    pthread_create(&t, NULL, handler, NULL);

    uint64_t rounds[5];
    uint32_t v = 0;
    for (int r = 0; r < 5; r++) {
        uint64_t t0 = now_ns();
        for (long i = 0; i < stores; i++) {
            volatile uint32_t *p = (volatile uint32_t *)(mem + ((i * 64) % (pages * PAGE)));
            expect_old = *p;
            expect_new = ++v;
            *p = v;
        }
        rounds[r] = (now_ns() - t0) / stores;
    }
    qsort(rounds, 5, sizeof rounds[0], cmp);
    if (seen != 5 * (uint64_t)stores || wrong) {
        fprintf(stderr, "store_bare: saw %lu of %lu stores, %lu with wrong values\n", (unsigned long)seen,
                5 * (unsigned long)stores, (unsigned long)wrong);
        return 1;
    }
    printf("ns_per_store %lu\n", (unsigned long)rounds[2]);
    return 0;
}

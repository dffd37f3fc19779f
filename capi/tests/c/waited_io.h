/* Shared by the C API tests: CHECK, and one I/O submitted and waited for. */
#ifndef BLKSHIM_TEST_WAITED_IO_H
#define BLKSHIM_TEST_WAITED_IO_H

#include "blkshim.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define CHECK(cond)                                                           \
    do {                                                                      \
        if (!(cond)) {                                                        \
            fprintf(stderr, "FAIL %s:%d: %s (last error: %s)\n", __FILE__,    \
                    __LINE__, #cond, blkshim_last_error());                   \
            exit(1);                                                          \
        }                                                                     \
    } while (0)

struct io_wait {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int done;
    int calls;
    int result;
};

/* May run on any thread: only signals the waiter. */
static inline void on_done(void *opaque, int result)
{
    struct io_wait *w = opaque;
    pthread_mutex_lock(&w->lock);
    w->result = result;
    w->calls++;
    w->done = 1;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

static uint64_t next_tag = 1;

/* One I/O, waited for: the callback's result (it must run exactly once). */
static inline int do_io(const blkshim_writer *w, uint32_t op, uint64_t offset,
                        void *buf, size_t len)
{
    struct io_wait iw = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
                         0, 0, 0};
    int rc = blkshim_submit(w, op, offset, buf, len, 0, next_tag++, on_done,
                            &iw);
    CHECK(rc == 0);
    pthread_mutex_lock(&iw.lock);
    while (!iw.done)
        pthread_cond_wait(&iw.cond, &iw.lock);
    pthread_mutex_unlock(&iw.lock);
    /* A second call would have come by now only if it raced; check anyway. */
    usleep(1000);
    CHECK(iw.calls == 1);
    return iw.result;
}

#endif

/*
 * xen-xswatch: XenStore watch logger and migration hook for the real-Xen
 * harness (runs in dom0; linked against libxenstore).
 *
 *   xen-xswatch PATH...              print "<uptime> <path> = <value>" (or
 *                                    "= <absent>") for every watch event,
 *                                    reading the value at once (a shell loop
 *                                    around xenstore-watch + xenstore-read
 *                                    reads it hundreds of ms late under TCG)
 *   xen-xswatch -hook SRCDOMID [-value V] PATH
 *                                    the destination's migration hook: for the
 *                                    first event under
 *                                    /local/domain/0/backend/vbd/<id>/<dev>/
 *                                    with id != SRCDOMID, write
 *                                    <that dir>/blkshim-resume = V ("wait")
 *                                    and print an XEN-LOG line; then exit.
 *
 * Build: gcc -O2 -o xen-xswatch xen-xswatch.c -lxenstore
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <xenstore.h>

static double uptime(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void printable(char *s, unsigned len)
{
    for (unsigned i = 0; i < len; i++)
        if (s[i] < 32 || s[i] > 126)
            s[i] = '.';
}

int main(int argc, char **argv)
{
    int hook = 0, a = 1;
    const char *src = NULL, *value = "wait";
    if (a < argc && !strcmp(argv[a], "-hook") && a + 1 < argc) {
        hook = 1;
        src = argv[a + 1];
        a += 2;
        if (a + 1 < argc && !strcmp(argv[a], "-value")) {
            value = argv[a + 1];
            a += 2;
        }
    }
    if (a >= argc) {
        fprintf(stderr, "usage: %s [-hook SRCDOMID [-value V]] PATH...\n", argv[0]);
        return 2;
    }
    struct xs_handle *xs = xs_open(0);
    if (!xs) {
        perror("xs_open");
        return 1;
    }
    for (int i = a; i < argc; i++)
        if (!xs_watch(xs, argv[i], "xh")) {
            perror("xs_watch");
            return 1;
        }
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *vbd = "/local/domain/0/backend/vbd/";
    size_t vl = strlen(vbd);
    for (;;) {
        unsigned num;
        char **vec = xs_read_watch(xs, &num);
        if (!vec)
            return 1;
        const char *path = vec[XS_WATCH_PATH];
        double t = uptime();
        if (hook) {
            if (!strncmp(path, vbd, vl)) {
                char id[32], dev[32];
                if (sscanf(path + vl, "%31[^/]/%31[^/]", id, dev) == 2 && strcmp(id, src) != 0) {
                    char node[256];
                    snprintf(node, sizeof node, "%s%s/%s/blkshim-resume", vbd, id, dev);
                    int ok = xs_write(xs, XBT_NULL, node, value, strlen(value));
                    printf("XEN-LOG %.2f hook: %s %s = %s (%.3f s after the event on %s)\n", uptime(),
                           ok ? "wrote" : "FAILED to write", node, value, uptime() - t, path);
                    free(vec);
                    return ok ? 0 : 1;
                }
            }
        } else {
            unsigned len = 0;
            char *v = xs_read(xs, XBT_NULL, path, &len);
            if (v) {
                printable(v, len);
                printf("%.3f %s = %.*s\n", t, path, len > 200 ? 200 : (int)len, v);
                free(v);
            } else {
                printf("%.3f %s = <absent>\n", t, path);
            }
        }
        free(vec);
    }
}

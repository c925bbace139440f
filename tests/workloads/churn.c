/*
 * churn: thousands of short-lived processes with hostile names.
 *
 *   churn COUNT LIFETIME_MS REGIONS
 *
 * Forks COUNT children, at most 64 alive at a time. Each child renames
 * itself (prctl PR_SET_NAME) to a name built from its index with quotes,
 * backslashes, a newline, braces and an invalid UTF-8 byte, writes REGIONS
 * private anonymous regions (unmergeable: PROT_NONE guards), lives
 * LIFETIME_MS and exits.
 * Prints {"event":"done","children":N} when all are reaped.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

static void child(int i, int lifetime_ms, int regions)
{
    static const char *hostile[] = {"a\"b", "c\\d", "e\nf", "{g=}", "h\xff\xfei", "j,k"};
    char name[16];
    snprintf(name, sizeof(name), "%s%d", hostile[i % 6], i);
    prctl(PR_SET_NAME, name, 0, 0, 0);
    for (int r = 0; r < regions; r++) {
        char *m = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                       -1, 0);
        if (m == MAP_FAILED)
            _exit(1);
        if (mprotect(m + 2 * 4096, 4096, PROT_NONE))
            _exit(1);
        m[0] = m[4096] = 1;
    }
    usleep((useconds_t)lifetime_ms * 1000);
    _exit(0);
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: churn COUNT LIFETIME_MS REGIONS\n");
        return 2;
    }
    int count = atoi(argv[1]), lifetime_ms = atoi(argv[2]), regions = atoi(argv[3]);
    int alive = 0, done = 0;
    for (int i = 0; i < count; i++) {
        if (alive >= 64) {
            if (wait(NULL) > 0)
                done++;
            alive--;
        }
        pid_t pid = fork();
        if (pid < 0)
            return 1;
        if (pid == 0)
            child(i, lifetime_ms, regions);
        alive++;
    }
    while (alive-- > 0)
        if (wait(NULL) > 0)
            done++;
    printf("{\"event\":\"done\",\"children\":%d}\n", done);
    return 0;
}

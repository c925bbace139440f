/*
 * deepen: a process family that keeps deepening its anon_vma hierarchy.
 *
 *   deepen GENERATIONS INTERVAL_MS
 *
 * Maps 4 private anonymous regions of 4 pages and writes them, then forks a
 * chain: every INTERVAL_MS the newest generation forks the next one, which
 * writes its regions (COW). All generations stay alive, so no anon_vma is
 * reused and the family's maximum depth grows by one per interval.
 * Prints {"event":"start","pid":P} first and {"event":"ready"} from the last
 * generation; every process exits when stdin reaches EOF.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define REGIONS 4
#define PAGE 4096

static char *region[REGIONS];

static void say(const char *buf)
{
    size_t len = strlen(buf);
    if (write(1, buf, len) != (ssize_t)len)
        _exit(3);
}

static void touch(void)
{
    for (int r = 0; r < REGIONS; r++)
        for (int p = 0; p < 4; p++)
            region[r][p * PAGE] = (char)(r + p + 1);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: deepen GENERATIONS INTERVAL_MS\n");
        return 2;
    }
    int gens = atoi(argv[1]);
    int interval_ms = atoi(argv[2]);
    char buf[128];
    snprintf(buf, sizeof(buf), "{\"event\":\"start\",\"pid\":%d}\n", getpid());
    say(buf);
    for (int r = 0; r < REGIONS; r++) {
        /* a guard page after each region keeps the regions from merging */
        char *m = mmap(NULL, 5 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                       -1, 0);
        if (m == MAP_FAILED)
            return 1;
        mprotect(m + 4 * PAGE, PAGE, PROT_NONE);
        region[r] = m;
    }
    touch();
    for (int g = 1; g <= gens; g++) {
        usleep((useconds_t)interval_ms * 1000);
        pid_t child = fork();
        if (child < 0)
            return 1;
        if (child > 0) {
            char c;
            while (read(0, &c, 1) > 0)
                ;
            waitpid(child, NULL, 0);
            return 0;
        }
        touch();
    }
    say("{\"event\":\"ready\"}\n");
    char c;
    while (read(0, &c, 1) > 0)
        ;
    return 0;
}

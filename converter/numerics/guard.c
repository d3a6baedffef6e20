/* Not numerics: a last word before a bus error ends the process. The numerics read source bytes
   through mappings of the page cache (converter/sources/safetensors.py, map_tensor); a file cut
   short while they read it (copied over, rewritten) raises SIGBUS, which Python cannot turn into
   an exception, and so does a mapped output whose file system runs out of room.

   The handler writes the caller's message to stderr once (write(2) is async-signal-safe; a
   second thread faulting meanwhile waits for it), puts back the action that was there before
   (the default, or faulthandler's traceback) and returns: the faulting access runs again and
   that action ends the process. A SIGBUS that is not a fault of this process (sent by kill(2),
   si_code <= 0, or an early memory-error notice, BUS_MCEERR_AO) gets the previous action at once,
   without the message. */

#define _GNU_SOURCE
#include <signal.h>
#include <string.h>
#include <unistd.h>

static char note[1024];
static size_t note_len;
static struct sigaction previous;
static volatile int claimed, written;

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    (void)context;
    int fault = info != NULL && info->si_code > 0;
#ifdef BUS_MCEERR_AO
    fault = fault && info->si_code != BUS_MCEERR_AO;
#endif
    if (fault) {
        if (__sync_lock_test_and_set(&claimed, 1) == 0) {
            ssize_t ignored = write(2, note, note_len);
            (void)ignored;
            __sync_synchronize();
            written = 1;
        } else {
            while (!written)
                ;
        }
    }
    sigaction(SIGBUS, &previous, NULL);
    if (!fault)
        raise(sig);
}

int mx_note_sigbus(const char *message) {
    size_t n = strlen(message);
    if (n >= sizeof note)
        n = sizeof note - 1;
    memcpy(note, message, n);
    note_len = n;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_SIGINFO;
    return sigaction(SIGBUS, &sa, &previous);
}

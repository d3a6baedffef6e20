/* Not numerics: a last word before a SIGBUS ends the process. The numerics read source bytes
   through mappings of the page cache (converter/sources/safetensors.py, map_tensor); a file cut
   short while they read it (copied over, rewritten) raises SIGBUS, which Python cannot turn into
   an exception. The handler writes the caller's message to stderr (write(2) is async-signal-safe)
   and returns; SA_RESETHAND has put back the default action, so the faulting read runs again and
   the process ends with SIGBUS, as it would have. */

#include <signal.h>
#include <string.h>
#include <unistd.h>

static char note[1024];
static size_t note_len;

static void on_sigbus(int sig) {
    (void)sig;
    ssize_t ignored = write(2, note, note_len);
    (void)ignored;
}

int mx_note_sigbus(const char *message) {
    size_t n = strlen(message);
    if (n >= sizeof note)
        n = sizeof note - 1;
    memcpy(note, message, n);
    note_len = n;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigbus;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESETHAND;
    return sigaction(SIGBUS, &sa, NULL);
}

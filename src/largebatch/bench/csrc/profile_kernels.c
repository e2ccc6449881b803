/* The shipped LAMB/LARS kernels with a switch to run one pass alone, for the benchmark's profile
 * (bench/profile.py). Built by largebatch.optim.kernel's builder with -I on the kernel's folder.
 *
 * phase 0: the real step (pass 1 then pass 2 per tensor); 1: pass 1 alone (writes the moments and the
 * norms and ratios to `out`); 2: pass 2 alone, with the ratios the caller left in out[:, 2]. Only phase 0
 * is a correct step: LAMB's pass 2 alone reads whatever u the last pass 1 left in the scratch. */
static int lb_profile_phase = 0;
#define LB_RUN_PASS1 (lb_profile_phase != 2)
#define LB_RUN_PASS2 (lb_profile_phase != 1)
#include "largebatch_kernels.c"

void lb_profile_set_phase(int phase) { lb_profile_phase = phase; }

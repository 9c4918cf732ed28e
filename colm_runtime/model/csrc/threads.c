/* OpenMP thread pools (libgomp keeps one per thread that has started a parallel region).
 *
 * The server loads and warms the model on its main thread, then runs every step on the engine thread.
 * The main thread's idle pool measurably slows the engine thread's parallel regions on a 2-core
 * machine (300 small torch ops: 9-10 ms with the pool released, 13-20 ms with it kept), so the main
 * thread releases it before the engine thread starts (OpenMP 5.0's hard pause: the pool's threads exit;
 * a later parallel region on that thread starts a new one).
 */
#include <omp.h>

int release_thread_pool(void) {
#if _OPENMP >= 201811 || (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 9) /* libgomp has it from gcc 9 */
    return omp_pause_resource_all(omp_pause_hard);
#else
    return -1;
#endif
}

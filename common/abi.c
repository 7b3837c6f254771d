/* abi.c - compiled only into the shared library libkvtrace.so, which bundles every module
 * for engines and the Python binding. Bindings call this first to check they match.
 */
#include "kvt_common.h"

/** ABI of libkvtrace.so: bumped when a public struct or signature changes. */
int kvt_abi_version(void)
{
    return KVT_ABI_VERSION;
}

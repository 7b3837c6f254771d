/* version.c - library version, compiled into the shared library and the CLI. */
#include "kvt_common.h"

const char *kvt_version_string(void)
{
    return KVT_VERSION_STRING;
}

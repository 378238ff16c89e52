/* codedata with paging on (see codedata.c). */
#define PAGED 1
#include "codedata.c"

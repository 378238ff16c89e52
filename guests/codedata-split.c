/* codedata with its data on pages of its own (see codedata.c). */
#define SPLIT 1
#include "codedata.c"

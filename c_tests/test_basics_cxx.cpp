// The same test as test_basics.c, compiled as C++17: the header must work in C++.
#include "test_basics.c"

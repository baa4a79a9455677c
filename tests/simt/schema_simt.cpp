// The op schemas of csrc/fusedloss.cpp, registered again under the namespace of the emulated
// kernels (FUSEDLOSS_LIBRARY=fusedloss_simt, set by the build in __init__.py).
#include "../../csrc/fusedloss.cpp"

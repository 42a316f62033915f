#!/usr/bin/env bash
# Run a command as if the CPU had AVX2 but no AVX-512 (issue 11's AMD EPYC host), on a CPU that has it.
#
#   benchmarks/avx2_env.sh .venv/bin/python -m benchmarks.bench_study --skip-study
#   benchmarks/avx2_env.sh --check            # print what each library now uses, then exit
#
# What is switched off, library by library:
#   torch (ATen kernels)     ATEN_CPU_CAPABILITY=avx2     -> torch.backends.cpu.get_cpu_capability() == "AVX2"
#   oneDNN (convolutions)    ONEDNN_MAX_CPU_ISA=AVX2      -> ONEDNN_VERBOSE shows isa "Intel AVX2"
#   MKL (torch's BLAS)       MKL_ENABLE_INSTRUCTIONS=AVX2
#   numpy (SIMD dispatch)    NPY_DISABLE_CPU_FEATURES     -> np.show_runtime() lists X86_V4/AVX512_* as not found
#   OpenBLAS (numpy, scipy)  OPENBLAS_CORETYPE=Zen        -> the AVX2 (Haswell) kernels AMD Zen 2/3 get
# Not switched off: Embree (embreex). embreex creates its Embree device with no configuration
# string (EmbreeDevice() takes no argument) and Embree 4 reads no config file or variable, so its
# ray casting still dispatches to AVX-512 on a host that has it: the render stage's ray casting
# (~0.3 CPU-s of ~1 per scan) is the one part this emulation leaves faster than on an AVX2 host.
# scipy.ndimage and scikit-image's compiled loops are built for the baseline ISA (no runtime
# dispatch), so they run the same code on both hosts.
set -euo pipefail

export ATEN_CPU_CAPABILITY=avx2
export ONEDNN_MAX_CPU_ISA=AVX2
export DNNL_MAX_CPU_ISA=AVX2
export MKL_ENABLE_INSTRUCTIONS=AVX2
# numpy 2.x names (np.show_runtime() "found"); a name numpy does not know is ignored with a warning
export NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR"
export OPENBLAS_CORETYPE=Zen
# a marker for benchmarks: /proc/cpuinfo still lists avx512f under this emulation
export MRIFACE_EMULATED_ISA=AVX2

if [[ "${1:-}" == "--check" ]]; then
    PY="${PYTHON:-.venv/bin/python}"
    ONEDNN_VERBOSE=1 "$PY" - 2>&1 <<'EOF' | grep -v "^onednn_verbose,v1,\(primitive\|graph\|info,\(graph\|oneDNN\|cpu,runtime\|gpu\)\)"
import ctypes, glob, os
import numpy as np
import torch

print("torch CPU capability:", torch.backends.cpu.get_cpu_capability())
from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
print("numpy dispatch targets in use:", [f for f in __cpu_dispatch__ if __cpu_features__.get(f)])
for lib, fn in (("numpy.libs/libscipy_openblas64_*.so", "scipy_openblas_get_corename64_"),
                ("scipy.libs/libscipy_openblas-*.so", "scipy_openblas_get_corename")):
    for path in glob.glob(os.path.join(os.path.dirname(np.__file__), "..", lib)):
        f = getattr(ctypes.CDLL(path), fn)
        f.restype = ctypes.c_char_p
        print(f"OpenBLAS core ({os.path.basename(path)}):", f().decode())
# one channels-last convolution (a small one does not reach oneDNN): ONEDNN_VERBOSE prints its ISA
x = torch.ones(1, 64, 56, 56).to(memory_format=torch.channels_last)
torch.nn.functional.conv2d(x, torch.ones(64, 64, 3, 3).to(memory_format=torch.channels_last))
EOF
    exit 0
fi

exec "$@"

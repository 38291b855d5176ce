"""One BLAS thread in a per-clip stage's processes: import this first, before numpy loads.

normalize and spectrogram spread clips over worker processes (``audiocnn.parallel``), and their
matrix products are small (a clip's spectra times the mel filterbank). OpenBLAS, loaded with
numpy, starts a pool of threads per core in the stage's process and again in every forked
worker; each thread spins for a while after it starts or works, on the cores the workers need.
Set before numpy loads, ``OPENBLAS_NUM_THREADS=1`` means no such pool. Measured with two
workers at 30,000 FSDD-sized clips (CPU seconds of the stage and its workers, medians of 4-5
runs): spectrogram 5.87 against 6.17 s, normalize 6.83 against 7.54 s, and 6.25 against 6.93 s
for spectrogram with the pool already limited after loading (``parallel.one_blas_thread``,
which still covers library callers). A value the user set is kept. The stage scripts import
this module before anything that imports numpy.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

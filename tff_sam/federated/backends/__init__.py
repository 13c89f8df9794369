"""Where TFF runs: the execution contexts (`cpp`, `tf`, remote workers), the local
C++ worker's lifecycle, and backend failures as user errors."""

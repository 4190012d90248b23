"""The process's own resources, tuned for training on a CPU: the C allocator (allocator.py) and OpenMP's
threads (threads.py). Depends on nothing else in lorakit."""

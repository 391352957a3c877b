"""The calls that touch the kernel: spawn, cgroups, PID files, sd_notify, paths."""

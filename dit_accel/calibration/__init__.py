"""Calibration tools: the offline cache-schedule search behind ``dit-accel calibrate``
(:mod:`~dit_accel.calibration.schedule_search`; the command line is :mod:`~dit_accel.calibration.cli`)."""

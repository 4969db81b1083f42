"""Developer tools, not part of what crossport ships: the EMNIST stand-in archive (``standin``), the no-false-alarm
matrix (``gate_matrix``) and the gate's power as a number (``gate_power``)."""

"""Fault drills: `python -m drills.chaos` (kills, a freeze and a lost host; the job must heal
bitwise) and `python -m drills.reliability` (fresh-process trainings, hangs counted)."""

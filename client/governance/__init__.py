"""What the hospital allows and what it keeps: app approval, the node policy, the tamper-evident audit log."""

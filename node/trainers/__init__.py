"""Ready-made trainer plug-ins (see node/trainer.py for the interface)."""

__version__ = "0.0.1"

# The one hand-written module: no notebook exports here. Names are resolved lazily so that
# `import forgenb` stays light (torch and transformers load only when you train).
_LAZY = {'train': 'forgenb.run', 'run_job': 'forgenb.run', 'Workspace': 'forgenb.core', 'InputError': 'forgenb.core',
         'submit': 'forgenb.jobs', 'attach': 'forgenb.ui.panels', 'Dashboard': 'forgenb.ui.panels'}

def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'forgenb' has no attribute {name!r}")

"""The kernel side: facts, BTF and layout, the attach plan, program build, the
session (the only importer of bcc), the state maps and /proc."""

"""Passes over aten graphs: find -> plan -> replace, and the glue to torch.compile and torch.export."""

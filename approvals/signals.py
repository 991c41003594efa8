"""approvals announces outcomes; orchestration listens. approvals never imports orchestration."""

from django.dispatch import Signal

# Sent after commit with request=ApprovalRequest once it is resolved (decided or expired).
approval_resolved = Signal()

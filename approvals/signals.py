"""approvals announces outcomes; orchestration listens. approvals never imports orchestration."""

from django.dispatch import Signal

# Sent after commit with request=ApprovalRequest once it is resolved (decided or expired).
approval_resolved = Signal()

# Sent inside the opening transaction with request=ApprovalRequest when a request opens for a
# group: at request_open, and again when the deadline sweep hands it to its second tier. A
# receiver's writes (notifications, console/notifications.py) commit with the request or not at
# all.
approval_opened = Signal()

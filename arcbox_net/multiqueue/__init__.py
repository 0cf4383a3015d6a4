"""``--queues N``: a multi-queue TAP served by N processes, one queue each.

Theory of operation. One Python process tops out at about one CPU; with
several busy connections the stack is CPU-bound while the machine has CPUs
to spare. A multi-queue TAP (IFF_MULTI_QUEUE) gives one fd per queue, and the
kernel keeps each guest flow on one queue: a flow the stack has written goes
to the queue it was written on (the TAP's flow table), any other flow goes to
a queue chosen by its hash. So a connection the guest opens stays with the
process that saw its SYN, for its whole life.

The main process (the NetworkStack the user runs) reads queue 0 and keeps
everything that has state worth sharing: DHCP leases, UDP and ICMP flows,
DNS over UDP, port forwards, the control API, the pcap file. Each worker
process reads one other queue and runs a stack of its own, but serves only
TCP connections the guest opens (a SYN, then the segments of connections it
holds). Every other frame it receives is relayed to the main process, which
handles it as if it had come from its own queue; the main process's answer
then pulls the flow onto queue 0. That also covers a forwarded connection
whose flow-table entry expired while idle (the kernel then hashes it, maybe
to a worker's queue).

Main and workers talk over the worker's stdin/stdout: messages of a 4-byte
length, a type byte and a payload (``messages``). ``supervisor`` is the main
process's side (``QueueWorkers``, told what happens by the stack through its
public methods and callbacks); ``worker`` is the worker process, run as
``python -m arcbox_net.multiqueue.worker``. Workers send their stats and connections
once a second when anything moved (``stack.stats()`` and
``stack.connections()`` merge the latest), TCP events while someone
subscribes, copies of their frames while a capture runs, and their log.

All queues are opened, and so attached, before anything is read: frames for a
worker that is still starting wait in its queue (the kernel's queue of
txqueuelen frames). Detaching a queue later would renumber the others and
move live flows, so a worker that exits ends the whole stack (logged, as when
the VM's link goes), which its supervisor restarts.
"""

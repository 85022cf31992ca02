# A small transparent TCP sidecar written with Python asyncio, run by `interceptor bench` and
# the end-to-end tests as a third-party-like proxy whose I/O pattern differs from ours and from
# haproxy's: one read of up to 64 KiB, one write, await drain, per direction.
#
# Outbound: 127.0.0.1:15001, upstream = SO_ORIGINAL_DST. Inbound: 0.0.0.0:15006, upstream =
# SO_ORIGINAL_DST (the pod's own address), connected from 127.0.0.6 so it is not captured again.
# Must run as the proxy identity (UID 1337) so its own connections are left alone.
import asyncio
import socket
import struct
import sys

SO_ORIGINAL_DST = 80


def original_dst(sock):
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, ip = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(ip), port


async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass


def handler(inbound):
    async def handle(reader, writer):
        sock = writer.get_extra_info("socket")
        try:
            host, port = original_dst(sock)
            local = ("127.0.0.6", 0) if inbound else None
            up_reader, up_writer = await asyncio.open_connection(host, port, local_addr=local)
        except OSError as err:
            print(f"upstream: {err}", file=sys.stderr, flush=True)
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        up_writer.close()
        writer.close()

    return handle


async def main():
    outbound = await asyncio.start_server(handler(False), "127.0.0.1", 15001, backlog=1024)
    inbound = await asyncio.start_server(handler(True), "0.0.0.0", 15006, backlog=1024)
    print("asyncio proxy listening", flush=True)
    async with outbound, inbound:
        await asyncio.gather(outbound.serve_forever(), inbound.serve_forever())


asyncio.run(main())

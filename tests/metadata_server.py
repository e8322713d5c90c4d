"""A fake GCE metadata server on localhost: `instance/maintenance-event`, long polls included, switched by the test.

Like the real one (https://cloud.google.com/compute/docs/metadata/getting-live-migration-notice): requests without
`Metadata-Flavor: Google` get 403; the answer carries an ETag; `?wait_for_change=true&last_etag=E` answers at once
when the value's etag is not E, else when `announce()` changes it or after `timeout_sec`. Point a process at it with
GCE_METADATA_HOST=`server.host`.
"""

from __future__ import annotations

import http.server
import threading
import urllib.parse

PATH = "/computeMetadata/v1/instance/maintenance-event"


class MetadataServer:
  """`with MetadataServer() as server:` serves "NONE" until `server.announce("TERMINATE_ON_HOST_MAINTENANCE")`."""

  def __init__(self, value: str = "NONE"):
    self.value, self.etag, self.requests = value, 1, 0
    self._changed = threading.Condition()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path != PATH or self.headers.get("Metadata-Flavor") != "Google":
          self.send_error(404 if url.path != PATH else 403)
          return
        with server._changed:
          server.requests += 1
          if query.get("wait_for_change") == "true":
            server._changed.wait_for(lambda: str(server.etag) != query.get("last_etag"),
                                     timeout=float(query.get("timeout_sec", 60)))
          body, etag = server.value.encode(), str(server.etag)
        try:
          self.send_response(200)
          self.send_header("Metadata-Flavor", "Google")
          self.send_header("ETag", etag)
          self.send_header("Content-Length", str(len(body)))
          self.end_headers()
          self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # a long poll of a process that has exited
          pass

      def log_message(self, *args):  # quiet
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
    self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

  def announce(self, value: str) -> None:
    """Sets the maintenance-event value; waiting long polls answer at once."""
    with self._changed:
      self.value, self.etag = value, self.etag + 1
      self._changed.notify_all()

  def start(self) -> MetadataServer:
    self._thread.start()
    return self

  def stop(self) -> None:
    self.announce(self.value)  # release the long polls
    self.httpd.shutdown()
    self.httpd.server_close()

  def __enter__(self) -> MetadataServer:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

// Java's own java.net.http.HttpClient as a Java service uses it: the default client, whose
// default version is HTTP/2, so on a plain-text URL the first request on a connection offers
// an upgrade (`Connection: Upgrade, HTTP2-Settings`, `Upgrade: h2c`), with its body.
// Usage: java JavaClient METHOD URL [BODY] (compiled by the tests). Prints, per request,
// "STATUS <code> <version> <xid> <transaction status> <body>" (exit 0), or "ERR <error>".
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;

public class JavaClient {
    public static void main(String[] args) throws Exception {
        HttpClient client = HttpClient.newHttpClient();
        HttpRequest.BodyPublisher body = args.length > 2
            ? HttpRequest.BodyPublishers.ofString(args[2])
            : HttpRequest.BodyPublishers.noBody();
        HttpRequest request = HttpRequest.newBuilder(URI.create(args[1]))
            .timeout(Duration.ofSeconds(20))
            .method(args[0], body)
            .build();
        try {
            // twice on one client: the second request reuses the connection the first one
            // offered HTTP/2 on (and was answered in HTTP/1.1)
            for (int i = 0; i < 2; i++) {
                HttpResponse<String> response =
                    client.send(request, HttpResponse.BodyHandlers.ofString());
                System.out.println("STATUS " + response.statusCode() + " " + response.version()
                    + " " + response.headers().firstValue("xid").orElse("-")
                    + " " + response.headers().firstValue("x-gts-transaction-status").orElse("-")
                    + " " + response.body().replace(' ', '_').strip());
            }
        } catch (Exception e) {
            System.out.println("ERR " + e);
        }
    }
}
